"""Sphinx configuration of the mtlmatch documentation site (``make docs`` builds it into docs/_build/html).

The API pages are docs/api/*.md, one per module (the list of documented modules is that folder). The config
reference and the notebooks are put into docs/_generated/ at build time (docs/gen_pages.py), never kept by hand.
MathJax is served from the built site (the sphinx-mathjax-offline package), so the site needs no network.
"""

import importlib
import inspect
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # TensorFlow (imported by mtlmatch.data) quiet
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))  # import mtlmatch from this checkout
sys.path.insert(0, DOCS)

import gen_pages  # noqa: E402  (needs the path above)

import mtlmatch  # noqa: E402

gen_pages.generate(os.path.join(DOCS, '_generated'))

project = 'mtlmatch'
author = 'The mtlmatch authors'
copyright = '2026, The mtlmatch authors'  # noqa: A001
release = mtlmatch.__version__
version = release

extensions = [
    'myst_nb',  # Markdown pages (MyST) and the notebooks with their stored outputs
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx-mathjax-offline',  # MathJax 3 copied into _static/mathjax: maths renders offline
]

exclude_patterns = ['_build', 'README.md', '**.ipynb_checkpoints']
source_suffix = {'.md': 'myst-nb', '.ipynb': 'myst-nb'}

# Notebooks are rendered with the outputs stored in them (python experiments/notebooks.py re-runs them).
nb_execution_mode = 'off'
nb_merge_streams = True

myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist']
myst_heading_anchors = 4

# Docstrings write `name` for a name in code and ``x`` for a literal: show both as code.
default_role = 'literal'
autodoc_default_options = {'member-order': 'bysource'}
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
autoclass_content = 'both'
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Every cross-reference must resolve (a warning otherwise, and -W makes warnings errors); names from the libraries
# beside this one (no network: no intersphinx) are taken as they are.
nitpicky = True
nitpick_ignore_regex = [
    (r'py:.*', r'(jax|jnp|np|numpy|flax|nn|optax|orbax|ml_collections|tf|tensorflow|tfds|clu|typing|collections)\b.*'),
    (r'py:.*', r'(Any|Callable|Mapping|Sequence|Optional|Iterator|Iterable|Union|PyTree|Array|ArrayLike)\b.*'),
    (r'py:class', r'(int|float|str|bool|dict|list|tuple|bytes|object|None|type|callable)'),
    # A TFDS BuilderConfig dataclass (scenes.ScenesConfig) inherits fields annotated with TFDS's own types, which
    # autodoc renders as `tensorflow_datasets.core...` and a split `dict[str`.
    (r'py:class', r"(tensorflow_datasets\..*|'?dict\[str.*)"),
    (r'py:.*', r'(.*\.)?_[A-Za-z].*'),  # private helpers a docstring names are not in the API: shown as code
]

# Modules import each other under short names (``metrics as metrics_lib``); a docstring's `metrics_lib.f` is
# mtlmatch.metrics.f.
ALIASES = {'metrics_lib': 'mtlmatch.metrics'}


def resolve_short_names(app, env, node, contnode):
  """Resolves a Python reference Sphinx did not find: a module alias, a name documented under another full name,
  or a name autodoc leaves out.

  A docstring names `Objective.soft_counts` or ``mtlmatch.data.sources.Reader`` where autodoc documents another
  module's object or the package's re-export (``mtlmatch.data.X``): a name that ends exactly one documented object's
  full name is that object. A module constant (`SAFE_TO_CHANGE`; Sphinx's autodoc leaves out data without a doc
  comment) or a helper the package does not re-export links to the page of the module that defines it. Anything
  else stays unresolved, and nitpicky mode reports it.
  """
  if node.get('refdomain') != 'py':
    return None
  target = node['reftarget']
  for alias, full in ALIASES.items():
    if target.startswith(alias + '.'):
      target = full + target[len(alias) :]
  domain = env.get_domain('py')
  tail = target.split('.')[-1] if target.startswith('mtlmatch.') else target
  matches = {n for n in domain.objects if n == target or n.endswith('.' + tail)}
  if len(matches) == 1:
    return domain.resolve_xref(env, node['refdoc'], app.builder, node['reftype'], matches.pop(), node, contnode)
  module, name = target.rsplit('.', 1) if target.startswith('mtlmatch.') else (node.get('py:module') or '', target)
  if not module.startswith('mtlmatch'):
    return None
  head = name.split('.')[0]
  for owner in [module] + sorted(m for m in sys.modules if m.startswith(module + '.')):  # and its submodules
    if not hasattr(sys.modules.get(owner) or importlib.import_module(owner), head):
      continue
    obj = getattr(sys.modules[owner], head)
    home = getattr(obj, '__module__', None)
    if inspect.ismodule(obj) or (isinstance(home, str) and not home.startswith('mtlmatch')):
      return None  # another library's object (``jax.Array``, a module imported there): not ours to link
    for page in (home if isinstance(home, str) else owner, owner):
      while page and page not in domain.modules:  # the package that documents it: mtlmatch.data for data.sources
        page = page.rpartition('.')[0]
      if page:
        return domain.resolve_xref(env, node['refdoc'], app.builder, 'mod', page, node, contnode)
  return None


def setup(app):
  app.connect('missing-reference', resolve_short_names)


html_theme = 'sphinx_book_theme'
html_title = f'mtlmatch {release}'
html_theme_options = {
    'show_toc_level': 2,
    'home_page_in_toc': True,
    'use_download_button': False,
    'use_fullscreen_button': False,
    'navigation_with_keys': False,
}
# The header has the search field: the sidebar's second one goes.
html_sidebars = {'**': ['navbar-logo.html', 'icon-links.html', 'sbt-sidebar-nav.html']}
html_static_path = ['_static']
html_css_files = ['mtlmatch.css']
html_last_updated_fmt = None
