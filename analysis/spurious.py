"""Spurious signal: how much a method's cut sculpts mjj, measured on no-signal controls.

A cut on a score that knows the window (ANODE's ratio, CATHODE's classifier) keeps
background events inside the window more often than just outside it: the sideband flow only
interpolates there. With no signal at all the count n in the window then exceeds the fit's
b̂ by more than Poisson and the fit allow. The size of that excess, as a fraction f of b̂,
is the spurious signal (ATLAS's name in its resonance searches); the bump hunt adds f·b̂ to
σ_b in quadrature (``analysis.bumphunt.bump_at``).

f is the mean excess over no-signal controls, pooled over their tests with a cut,

    f = |Σ (n - b̂)| / Σ b̂

(the spurious signal of ATLAS is likewise the signal fitted to background-only templates).
``SPURIOUS_FRACTIONS`` holds the values that ``benchmarks/bump_hunt.py`` measured (see
``benchmarks/RESULTS.md``). ``trigfarm analyze cathode --events`` (the hybrid) takes
CATHODE's value, as the same sideband flow models its background. A method not in it has
not been measured, and its cut is trusted not to sculpt (f = 0), which ``trigfarm
analyze`` says.
"""

from __future__ import annotations

import numpy as np

#: f per method (± its bootstrap spread over experiments), measured on the 20 no-signal
#: controls of ``benchmarks/bump_hunt.py --dataset`` (the lhco-like million in disjoint
#: blocks of 41k events, flows of 3 MAFs learned on each block; every test with a cut in
#: 3.3-3.7 TeV pooled, CWoLa's in every window), pooled over three reruns whose flows
#: differ by thread timing. ANODE's ratio sculpts: +2.2 ± 0.6%. CATHODE (0.37 ± 0.31%) and
#: CWoLa (0.72 ± 0.14%) barely do. The interpolated ANODE, pooled over two reruns and every
#: window (it cuts in all of them): +2.7 ± 0.3%, most of it in the windows below 3.7 TeV,
#: next to the selection's turn-on. Larger samples and other flows may sculpt differently:
#: measure again before trusting a local Z at higher statistics.
SPURIOUS_FRACTIONS: dict[str, float] = {
    "anode": 0.022,
    "anode_interpolated": 0.027,
    "cathode": 0.0037,
    "cwola": 0.0072,
}


def spurious_fraction(observed: np.ndarray, expected: np.ndarray) -> float:
    """f from no-signal tests: the counts in the window and the fit's predictions.

    Example:
        >>> spurious_fraction(np.array([110.0, 90.0]), np.array([100.0, 100.0]))
        0.0
        >>> spurious_fraction(np.array([106.0, 98.0]), np.array([100.0, 100.0]))
        0.02
    """
    n, b = np.asarray(observed, np.float64), np.asarray(expected, np.float64)
    finite = np.isfinite(n) & np.isfinite(b) & (b > 0)
    if not finite.any():
        return float("nan")
    return abs(float(np.sum(n[finite] - b[finite]))) / float(np.sum(b[finite]))
