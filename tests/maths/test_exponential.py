"""φ-functions: the series and the recurrence agree where they meet, and match closed forms."""
import math

import pytest

from framework.maths.exponential import phi, phis


@pytest.mark.parametrize("z", [-1e-9, -1e-4, -0.3, -0.999999, -1.0, -1.000001, -2.5, -30.0, 0.7, 3.0])
def test_phi_matches_closed_forms(z):
    assert math.isclose(phi(0, z), math.exp(z), rel_tol=1e-15)
    assert math.isclose(phi(1, z), math.expm1(z) / z, rel_tol=1e-14)
    closed2 = (math.expm1(z) - z) / z**2 if abs(z) > 1e-3 else 0.5 + z / 6 + z * z / 24
    assert math.isclose(phi(2, z), closed2, rel_tol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_phi_recurrence_and_continuity(k):
    for z in (-0.5, -1.5, -4.0):  # φ_k(z) = z·φ_{k+1}(z) + 1/k!
        assert math.isclose(phi(k, z), z * phi(k + 1, z) + 1 / math.factorial(k), rel_tol=1e-13)
    assert math.isclose(phi(k, -1 + 1e-12), phi(k, -1 - 1e-12), rel_tol=1e-10)  # the series/recurrence seam
    assert math.isclose(phi(k, 0.0), 1 / math.factorial(k), rel_tol=1e-15)


def test_phis_and_bad_k():
    assert phis(0.5, 3) == [phi(1, -0.5), phi(2, -0.5), phi(3, -0.5)]
    with pytest.raises(ValueError):
        phi(-1, 0.1)
