import pytest
import torch

import fastlayers
from helpers import DEFAULT_ISA

ISAS = fastlayers._C.supported_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per CPU kernel path this machine supports."""
    fastlayers.set_isa(request.param)
    yield request.param
    fastlayers.set_isa(DEFAULT_ISA)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    info = fastlayers.build_info()
    return [f"fastlayers: {info}",
            "AVX-512 kernels are compiled but skipped on CPUs without AVX-512"
            if "avx512" not in ISAS else "AVX-512 kernels tested"]
