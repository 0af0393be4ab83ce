"""What dropout's ``p`` means in :mod:`jaxbn.cs231n`: the one switch between the assignment's eras.

The 2016-17 write-ups this package follows by default use ``p`` (``dropout_forward``'s
``dropout_param["p"]`` and ``FullyConnectedNet(dropout=p)``) as the probability of *dropping* a
unit. From 2018 on the assignment uses it as the probability of *keeping* one. A notebook of the
later kind picks that meaning with one line at its top::

    import jaxbn.cs231n; jaxbn.cs231n.set_dropout_p("keep")

``dropout_keep_ratio=`` (2021+) is a keep probability in either setting.
"""

from __future__ import annotations

MEANINGS = ("drop", "keep")
_meaning = "drop"


def set_dropout_p(meaning: str) -> str:
    """Sets what dropout's ``p`` means in :mod:`jaxbn.cs231n`; returns the previous meaning.

    ``"drop"`` (the default, the 2016-17 assignment): ``p`` is the probability of dropping a unit,
    ``dropout=0`` is no dropout. ``"keep"`` (the 2018+ assignment): ``p`` is the probability of
    keeping one, ``dropout=1`` is no dropout, and ``FullyConnectedNet.dropout_param["p"]`` holds
    the keep probability as the later notebooks expect. ``dropout_forward`` reads the setting at
    each call, ``FullyConnectedNet`` when it is constructed.

    Args:
      meaning: ``"drop"`` or ``"keep"``.

    Returns:
      The meaning that was in force before the call, so a caller can restore it.

    Raises:
      ValueError: ``meaning`` is neither ``"drop"`` nor ``"keep"``.

    Example:
      >>> import jaxbn.cs231n
      >>> previous = jaxbn.cs231n.set_dropout_p("keep")   # a 2018+ notebook
      >>> previous, jaxbn.cs231n.dropout_p()
      ('drop', 'keep')
      >>> _ = jaxbn.cs231n.set_dropout_p(previous)
    """
    global _meaning
    if meaning not in MEANINGS:
        raise ValueError(f"set_dropout_p takes 'drop' (p is the probability of dropping a unit, "
                         f"the 2016-17 assignment) or 'keep' (p is the probability of keeping "
                         f"one, 2018 on); got {meaning!r}.")
    previous, _meaning = _meaning, meaning
    return previous


def dropout_p() -> str:
    """What dropout's ``p`` means now: ``"drop"`` (default) or ``"keep"``
    (see :func:`set_dropout_p`).

    Example:
      >>> import jaxbn.cs231n
      >>> jaxbn.cs231n.dropout_p()  # the 2016-17 meaning until set_dropout_p("keep")
      'drop'
    """
    return _meaning


def drop_rate(p: float, meaning: str | None = None) -> float:
    """The drop probability that ``p`` stands for under ``meaning`` (the current one if None).

    Example:
      >>> from jaxbn.cs231n._dropout_p import drop_rate
      >>> drop_rate(0.25, "drop"), drop_rate(0.25, "keep")
      (0.25, 0.75)
    """
    return p if (meaning or _meaning) == "drop" else 1.0 - p
