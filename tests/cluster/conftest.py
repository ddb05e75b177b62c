import pytest

from tests.cluster.crd_schemas import PYTORCHJOB_CRD, validator


@pytest.fixture(scope="module")
def crd_validator():
    """Strict validator of the Training Operator v1.9.0 PyTorchJob CRD (unknown fields rejected)."""
    return validator(PYTORCHJOB_CRD, "v1")
