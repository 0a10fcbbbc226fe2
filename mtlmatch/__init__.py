"""mtlmatch: multi-task learning of classification tasks across datasets that annotate different tasks.

Layers (dependencies point down): ``main``/``experiments`` → ``train`` → ``models``, ``data``, ``losses``,
``weighting`` → ``tasks``. ``losses`` and ``weighting`` are pure maths on arrays.
"""

__version__ = '0.1.0'
