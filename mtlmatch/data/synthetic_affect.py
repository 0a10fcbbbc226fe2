"""Synthetic affect benchmark (the embedded default; no download): grey 32×32 "faces" with expressions and AUs.

Generative model, per image (all randomness from ``numpy.random.default_rng([seed, split_id])``):

1. expression ``e ~ Uniform{0..6}`` (classes of ``load_prior('expressions_to_aus')``: neutral, happy, sad, ...);
2. action units ``a_k ~ Bernoulli(S[e, k])`` independently, with the *softened* expert prior
   ``S = low + (high − low)·R`` (default high 0.9, low 0.03: prototypical AUs 1 → 0.9, absent 0 → 0.03, observed
   fractions in between) — :func:`softened_prior` returns the exact table drawn from;
3. image = base face (random size, brightness and identity blobs) + ``0.3 Σ_k a_k · u_k · T_k`` (``T_k`` the fixed
   template of AU k: a few Gaussian blobs at plausible face positions, :data:`AU_BLOBS`; intensity
   ``u_k ~ U(0.4, 1)``), the whole face shifted by up to ±2 px, plus pixel noise N(0, 0.08²); clipped, uint8.

4. valence and arousal ``(v, a) = clip(c_e + N(0, 0.15²·I), −1, 1)``, ``c_e`` the expression's place on the
   circumplex (:data:`VA_CENTRES`: happy +V; sad −V −A; angry and fearful −V +A; surprised +A; neutral 0), drawn
   from a stream of their own (``default_rng([seed, split_id, VA_STREAM])``), so the other labels and the images
   are the same with or without VA.

The expression is visible only through its AUs (what makes AU → expression relatedness useful): from perfectly
known AUs the Bayes-optimal expression accuracy is ≈0.96 under the default prior, lower through the pixels; VA is
visible only through the expression, so it is related to both other tasks.

Splits: ``expressions`` (expression labels used), ``aus`` (AU labels used), ``va`` (VA used, as Aff-Wild2 sits
beside AffectNet and the AU datasets; only with ``num_va > 0``), ``coannotated`` (expression and AUs; its first
``n`` examples are the nested subsets ``coannotated_n``) and ``test`` (all). The TFDS builder
:class:`MtlmatchSyntheticAffect` stores every split with every label; the *sources* decide which tasks are visible.
Usage::

    bench = synthetic_affect_benchmark(data_dir='/tmp/tfds', seed=0)       # generates once (seconds), then cached
    S = softened_prior()                                                   # float32 [7, 17]
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mtlmatch.data._quiet import log_generation
from mtlmatch.data.readers import TfdsReader
from mtlmatch.data.sources import Benchmark, Source, default_data_dir, generate_once, make_benchmark
from mtlmatch.priors import load_prior
from mtlmatch.tasks import TaskSpec

IMAGE_SIZE = 32
SPLIT_IDS = {'expressions': 1, 'aus': 2, 'coannotated': 3, 'test': 4, 'va': 5}
# Valence/arousal: each expression's centre on the circumplex (Russell 1980), the noise, and the stream they use.
VA_CENTRES = {
    'neutral': (0.0, 0.0),
    'happy': (0.7, 0.3),
    'sad': (-0.6, -0.4),
    'surprised': (0.2, 0.7),
    'fearful': (-0.6, 0.6),
    'disgusted': (-0.6, 0.3),
    'angry': (-0.5, 0.7),
}
VA_NOISE_STD = 0.15
VA_STREAM = 0x5641
AU_AMPLITUDE = 0.3
NOISE_STD = 0.08
INTENSITY_RANGE = (0.4, 1.0)
MAX_SHIFT = 2

# AU → Gaussian blobs (row, col, sigma, sign·weight) on a 32×32 face centred at (16.5, 16): brows ≈ rows 7–10,
# eyes 11–13, nose 14–20, mouth 21–25, chin 28–30. Paired blobs are left/right symmetric.
AU_BLOBS = {
    'AU1': [(7.5, 13.0, 1.2, 1.0), (7.5, 19.0, 1.2, 1.0)],  # inner brow raiser
    'AU2': [(7.0, 9.0, 1.2, 1.0), (7.0, 23.0, 1.2, 1.0)],  # outer brow raiser
    'AU4': [(9.5, 14.0, 1.3, -1.0), (9.5, 18.0, 1.3, -1.0), (8.5, 16.0, 1.0, -0.7)],  # brow lowerer
    'AU5': [(11.0, 10.5, 0.9, 1.0), (11.0, 21.5, 0.9, 1.0)],  # upper lid raiser
    'AU6': [(16.0, 8.0, 1.8, 0.8), (16.0, 24.0, 1.8, 0.8)],  # cheek raiser
    'AU7': [(13.0, 10.5, 1.0, -1.0), (13.0, 21.5, 1.0, -1.0)],  # lid tightener
    'AU9': [(14.5, 14.5, 1.0, -1.0), (14.5, 17.5, 1.0, -1.0)],  # nose wrinkler
    'AU10': [(20.0, 13.5, 1.1, 1.0), (20.0, 18.5, 1.1, 1.0)],  # upper lip raiser
    'AU11': [(19.0, 11.0, 1.0, -1.0), (19.0, 21.0, 1.0, -1.0)],  # nasolabial deepener
    'AU12': [(21.5, 10.5, 1.1, 1.0), (21.5, 21.5, 1.1, 1.0)],  # lip corner puller
    'AU15': [(25.0, 11.0, 1.1, -1.0), (25.0, 21.0, 1.1, -1.0)],  # lip corner depressor
    'AU17': [(28.0, 16.0, 1.6, 1.0)],  # chin raiser
    'AU20': [(23.0, 8.5, 1.0, -1.0), (23.0, 23.5, 1.0, -1.0)],  # lip stretcher
    'AU23': [(22.5, 16.0, 0.8, 1.0)],  # lip tightener
    'AU24': [(23.5, 14.0, 0.9, 1.0), (23.5, 18.0, 0.9, 1.0)],  # lip pressor
    'AU25': [(23.0, 14.5, 0.9, -1.0), (23.0, 17.5, 0.9, -1.0)],  # lips part
    'AU26': [(26.0, 16.0, 1.4, -1.0), (29.5, 16.0, 1.2, 0.6)],  # jaw drop
}


# The VA task: two bounded outputs, trained with the CCC loss (the ABAW challenges' metric). Validation decided the
# loss: the affect_va study's `mtl` cell (experiments/case_studies.py affect_va, 3 seeds) reached a validation VA CCC
# of 0.802 ± 0.006 with 'ccc' and 0.756 ± 0.004 with 'mse' (`mtl_va_mse`; experiments/results/affect_va/).
VA_TASK = TaskSpec(
    'va', 'regression', 2, ('valence', 'arousal'), options={'loss': 'ccc', 'bound': 'tanh', 'range': (-1.0, 1.0)}
)


def tasks(va: bool = False) -> dict[str, TaskSpec]:
  """``expression`` (7-way) and ``aus`` (17 AUs, multilabel), exactly the prior's task specs, and with ``va`` the
  regression task ``va`` (valence, arousal in [−1, 1]; :data:`VA_TASK`)."""
  prior = load_prior('expressions_to_aus')
  out = {t.name: TaskSpec(t.name, t.kind, t.num_classes, t.class_names) for t in (prior.task_a, prior.task_b)}
  return {**out, 'va': VA_TASK} if va else out


def sample_va(rng: np.random.Generator, expression: np.ndarray) -> np.ndarray:
  """float32 ``[n, 2]``: (valence, arousal) = clip(centre of the expression + N(0, 0.15²), −1, 1)."""
  names = load_prior('expressions_to_aus').task_a.class_names
  centres = np.asarray([VA_CENTRES[name] for name in names], np.float64)
  va = centres[expression] + VA_NOISE_STD * rng.standard_normal((len(expression), 2))
  return np.clip(va, -1.0, 1.0).astype(np.float32)


def softened_prior(high: float = 0.9, low: float = 0.03) -> np.ndarray:
  """``S = low + (high − low)·R`` float32 ``[7, 17]``: p(AU k | expression i) the generator draws from."""
  if not 0 <= low < high <= 1:
    raise ValueError(f'softened_prior (low, high): got ({low!r}, {high!r}), expected 0 <= low < high <= 1')
  r = load_prior('expressions_to_aus').relatedness.astype(np.float64)
  return (low + (high - low) * r).astype(np.float32)


def _blob(r, c, sigma, size: int = IMAGE_SIZE) -> np.ndarray:
  """Gaussian blobs ``exp(−((y−r)² + (x−c)²) / 2σ²)`` on the pixel grid, float32 ``[..., size, size]``.

  ``r``, ``c``, ``sigma`` broadcast together (e.g. ``[m]`` per image); the blob is separable, so it costs two 1-D
  exponentials per image.
  """
  r, c, sigma = np.broadcast_arrays(*(np.asarray(v, np.float32) for v in (r, c, sigma)))
  grid = np.arange(size, dtype=np.float32)
  gy = np.exp(-((grid - r[..., None]) ** 2) / (2 * sigma[..., None] ** 2))
  gx = np.exp(-((grid - c[..., None]) ** 2) / (2 * sigma[..., None] ** 2))
  return gy[..., :, None] * gx[..., None, :]


def au_templates(dy: int = 0, dx: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
  """float32 ``[17, size, size]``: the AU templates ``T_k`` (peak ≈ ±1), the face shifted by ``(dy, dx)``."""
  au_names = load_prior('expressions_to_aus').task_b.class_names
  out = np.zeros((len(au_names), size, size), np.float32)
  for k, name in enumerate(au_names):
    for r, c, sigma, w in AU_BLOBS[name]:
      out[k] += w * _blob(r + dy, c + dx, sigma, size)
  return out


def sample_labels(rng: np.random.Generator, n: int, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(expression int32 [n], aus int32 [n, 17])``: e uniform, ``a_k ~ Bernoulli(table[e, k])``."""
  expression = rng.integers(0, table.shape[0], size=n).astype(np.int32)
  aus = (rng.random((n, table.shape[1])) < table[expression]).astype(np.int32)
  return expression, aus


def render_faces(rng: np.random.Generator, aus: np.ndarray, size: int = IMAGE_SIZE, chunk: int = 4096) -> np.ndarray:
  """uint8 ``[n, size, size, 1]`` faces showing the active AUs (see the module docstring for the model).

  Drawn in face coordinates (centre (16.5, 16)), then translated as a whole by an integer shift, then noised.
  """
  n = aus.shape[0]
  grid = np.arange(size, dtype=np.float32)
  templates = au_templates(0, 0, size).reshape(aus.shape[1], -1)
  background = 0.15
  out = np.empty((n, size, size, 1), np.uint8)
  for lo in range(0, n, chunk):
    m = min(chunk, n - lo)
    ry, rx = rng.uniform(13.0, 15.0, (m, 1)), rng.uniform(10.5, 12.5, (m, 1))
    brightness = rng.uniform(0.45, 0.65, m).astype(np.float32)[:, None, None]
    inside = (((grid - 16.5) / ry) ** 2)[:, :, None] + (((grid - 16.0) / rx) ** 2)[:, None, :]
    face = background + (brightness - background) / (1.0 + np.exp(8.0 * (inside.astype(np.float32) - 1.0)))
    for r, c, sigma, w in (
        (12.0, 10.5, 1.0, -0.2),
        (12.0, 21.5, 1.0, -0.2),  # eyes
        (9.0, 10.0, 1.2, -0.1),
        (9.0, 22.0, 1.2, -0.1),  # brows
        (23.0, 14.0, 1.0, -0.12),
        (23.0, 16.0, 1.0, -0.12),
        (23.0, 18.0, 1.0, -0.12),
    ):  # mouth
      face += w * _blob(r, c, sigma, size)
    for _ in range(4):  # identity: low-frequency blobs anywhere on the face
      r, c = rng.uniform(6, 27, (2, m))
      face += rng.normal(0, 0.05, m).astype(np.float32)[:, None, None] * _blob(r, c, rng.uniform(1.5, 3.0, m), size)
    intensity = (aus[lo : lo + m] * rng.uniform(*INTENSITY_RANGE, size=(m, aus.shape[1]))).astype(np.float32)
    face += (AU_AMPLITUDE * intensity @ templates).reshape(m, size, size)
    # Translate the whole face by (dy, dx) in [-MAX_SHIFT, MAX_SHIFT]^2, filling with background.
    shift = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(m, 2))
    padded = np.pad(face, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT)), constant_values=background)
    rows = np.arange(size)[None, :] + MAX_SHIFT - shift[:, :1]  # [m, size]
    cols = np.arange(size)[None, :] + MAX_SHIFT - shift[:, 1:]
    face = padded[np.arange(m)[:, None, None], rows[:, :, None], cols[:, None, :]]
    face += NOISE_STD * rng.standard_normal(face.shape, dtype=np.float32)
    out[lo : lo + m, ..., 0] = np.round(np.clip(face, 0.0, 1.0) * 255)
  return out


def generate_split(
    seed: int, split: str, n: int, *, high: float = 0.9, low: float = 0.03, render: bool = True
) -> dict[str, np.ndarray]:
  """One split as numpy: ``expression`` [n], ``aus`` [n, 17], ``va`` float32 [n, 2], ``image`` uint8
  [n, 32, 32, 1] (if ``render``).

  Labels are drawn before the images, so ``render=False`` gives the same labels cheaply; VA comes from its own
  stream, so the other labels and the images do not depend on it.
  """
  if split not in SPLIT_IDS:
    raise ValueError(f'split: got {split!r}, expected one of {sorted(SPLIT_IDS)}')
  rng = np.random.default_rng([int(seed), SPLIT_IDS[split]])
  expression, aus = sample_labels(rng, int(n), softened_prior(high, low))
  out = {'expression': expression, 'aus': aus}
  out['va'] = sample_va(np.random.default_rng([int(seed), SPLIT_IDS[split], VA_STREAM]), expression)
  if render:
    out['image'] = render_faces(rng, aus)
  return out


# ----------------------------------------------------------------------------------------------------------------
# TFDS builder (cached generation).


@dataclasses.dataclass
class SyntheticAffectConfig(tfds.core.BuilderConfig):
  seed: int = 0
  num_expressions: int = 20000
  num_aus: int = 3000
  num_coannotated: int = 1000
  num_test: int = 2000
  prior_high: float = 0.9
  prior_low: float = 0.03
  num_va: int = 0


def make_config(
    *,
    seed: int = 0,
    num_expressions: int = 20000,
    num_aus: int = 3000,
    num_coannotated: int = 1000,
    num_test: int = 2000,
    prior_high: float = 0.9,
    prior_low: float = 0.03,
    num_va: int = 0,
) -> SyntheticAffectConfig:
  """A builder config whose name encodes every generation parameter (so each variant is cached separately)."""
  for arg, v in (('num_expressions', num_expressions), ('num_aus', num_aus), ('num_test', num_test)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f'{arg}: got {v!r}, expected an int >= 1')
  for arg, v in (('num_coannotated', num_coannotated), ('num_va', num_va)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f'{arg}: got {v!r}, expected an int >= 0')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed: got {seed!r}, expected an int >= 0')
  softened_prior(prior_high, prior_low)  # validates
  name = (
      f's{seed}_e{num_expressions}_a{num_aus}_c{num_coannotated}_t{num_test}_' f'h{prior_high:g}_l{prior_low:g}'
  ).replace('.', 'p') + (f'_v{num_va}' if num_va else '')
  return SyntheticAffectConfig(
      name=name,
      seed=int(seed),
      num_expressions=int(num_expressions),
      num_aus=int(num_aus),
      num_coannotated=int(num_coannotated),
      num_test=int(num_test),
      prior_high=float(prior_high),
      prior_low=float(prior_low),
      num_va=int(num_va),
  )


class MtlmatchSyntheticAffect(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of the synthetic affect splits (uint8 tensors, no PNG), generated from the config's seed."""

  VERSION = tfds.core.Version('1.1.0')
  # TFDS 4.9.10 locates a packaged builder's code with `importlib_resources` (installed only on Python < 3.9);
  # these builders ship no checksum or metadata files, so declare no code path, as for a builder made in Colab.
  code_path = None
  _log_download_bytes = log_generation  # generated locally: no "Downloading ... Unknown size" line
  RELEASE_NOTES = {
      '1.0.0': 'Faces = base + AU templates; AUs from the softened expressions→AUs prior.',
      '1.1.0': 'Valence/arousal from the expression (circumplex) in every split; the va split (num_va).',
  }

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8, encoding='bytes'),
                'expression': tfds.features.Tensor(shape=(), dtype=np.int32),
                'aus': tfds.features.Tensor(shape=(17,), dtype=np.int32),
                'va': tfds.features.Tensor(shape=(2,), dtype=np.float32),
                'index': tfds.features.Tensor(shape=(), dtype=np.int64),
            }
        ),
        citation=load_prior('expressions_to_aus').citation,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    sizes = {
        'expressions': c.num_expressions,
        'aus': c.num_aus,
        'coannotated': c.num_coannotated,
        'test': c.num_test,
        'va': c.num_va,
    }
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split, n):
    c = self.builder_config
    data = generate_split(c.seed, split, n, high=c.prior_high, low=c.prior_low)
    for i in range(n):
      yield i, {
          'image': data['image'][i],
          'expression': data['expression'][i],
          'aus': data['aus'][i],
          'va': data['va'][i],
          'index': np.int64(i),
      }


def prepare(data_dir: Optional[str] = None, **config) -> MtlmatchSyntheticAffect:
  """The prepared builder (generated into ``data_dir`` on first use, read from there afterwards)."""
  config = make_config(**config)
  return generate_once(
      lambda: MtlmatchSyntheticAffect(config=config, data_dir=default_data_dir(data_dir)),
      lambda: tfds.download.DownloadConfig(try_download_gcs=False),
  )


def _labels_fn(example):
  return {'expression': example['expression'], 'aus': example['aus'], 'va': example['va']}


def synthetic_affect_benchmark(
    *,
    data_dir: Optional[str] = None,
    seed: int = 0,
    num_expressions: int = 20000,
    num_aus: int = 3000,
    num_test: int = 2000,
    num_coannotated: int = 1000,
    coannotated_subsets: Optional[Sequence[int]] = None,
    prior_high: float = 0.9,
    prior_low: float = 0.03,
    num_va: int = 0,
    weights: Optional[Mapping[str, float]] = None,
) -> Benchmark:
  """Train sources ``expressions`` (expression only) and ``aus`` (AUs only), and with ``num_va > 0`` ``va`` (VA
  only, the task ``va``); eval ``test`` (every task), aux ``coannotated`` (expression and AUs, ``num_coannotated``)
  and ``coannotated_<n>`` (its first n) for each n in ``coannotated_subsets`` (default: 100 if ``num_coannotated``
  > 100). ``weights``: {source name: mixing weight} (default 1 each)."""
  weights = dict(weights or {})
  names = ['expressions', 'aus'] + (['va'] if num_va else [])
  unknown = set(weights) - set(names)
  if unknown:
    raise ValueError(f'weights: got unknown source names {sorted(unknown)}, expected names from {names}')
  if coannotated_subsets is None:
    coannotated_subsets = tuple(n for n in (100,) if n < num_coannotated)
  subsets = tuple(int(n) for n in coannotated_subsets)
  if any(not 0 < n <= num_coannotated for n in subsets):
    raise ValueError(
        f'coannotated_subsets: got {tuple(coannotated_subsets)}, expected sizes in [1, '
        f'num_coannotated={num_coannotated}]'
    )
  builder = prepare(
      data_dir,
      seed=seed,
      num_expressions=num_expressions,
      num_aus=num_aus,
      num_coannotated=num_coannotated,
      num_test=num_test,
      prior_high=prior_high,
      prior_low=prior_low,
      num_va=num_va,
  )
  reader = TfdsReader(builder, labels_fn=_labels_fn, description='synthetic_affect')
  train = (
      Source('expressions', reader, ('expression',), 'expressions', weights.get('expressions', 1.0)),
      Source('aus', reader, ('aus',), 'aus', weights.get('aus', 1.0)),
  ) + ((Source('va', reader, ('va',), 'va', weights.get('va', 1.0)),) if num_va else ())
  aux = {}
  if num_coannotated:
    aux['coannotated'] = Source('coannotated', reader, ('expression', 'aus'), 'coannotated')
    for n in subsets:
      aux[f'coannotated_{n}'] = Source(f'coannotated_{n}', reader, ('expression', 'aus'), f'coannotated[:{n}]')
  test_tasks = ('expression', 'aus') + (('va',) if num_va else ())
  return make_benchmark(
      'synthetic_affect',
      tasks(va=bool(num_va)),
      train,
      eval_sources=(Source('test', reader, test_tasks, 'test'),),
      aux_sources=aux,
      image_shape=(IMAGE_SIZE, IMAGE_SIZE, 1),
  )
