"""mtlmatch: multi-task learning of classification tasks across datasets that annotate different tasks.

Layers (dependencies point down): ``main``/``experiments`` → ``train`` (the loop) → ``experiment`` (the builder) →
``step`` (the train state and the pure step), ``evaluators`` → ``objective``, ``models``, ``data``, ``weighting`` →
``tasks`` (task kinds) → ``losses``, ``metrics``. ``losses`` and ``weighting`` are pure maths on arrays.
"""

__version__ = '0.2.0'
