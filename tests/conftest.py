import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
warnings.filterwarnings("ignore")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LP_SKIP_SLOW") == "1":
        skip = pytest.mark.skip(reason="LP_SKIP_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Restore ``os.environ`` after every test.

    A test that runs Lightning's DDP inside this process (one rank, e.g. ``helpers.fit_under_one_process_ddp``)
    leaves ``LOCAL_RANK``, ``NODE_RANK`` and ``MASTER_*`` in the environment; a later 2-process CLI run would
    inherit ``LOCAL_RANK``, take its processes for externally launched, and rank 0 would wait for a rank 1 that
    is never started."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)
