import dist
import pytest


@pytest.fixture(scope="session", autouse=True)
def _stop_rank_pools():
    yield
    dist.shutdown()
