"""A tiny finished pretraining run shared by the tests of tests/cli."""

from __future__ import annotations

import pytest

from tests.examples.test_pretrain import SMALL as PRETRAIN_SMALL


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(output folder, result) of 1 epoch with the SMALL settings of tests/examples/test_pretrain.py."""
    from cmd.cli import pretrain

    out = tmp_path_factory.mktemp("pretrain")
    result = pretrain.main([*PRETRAIN_SMALL, "--epochs", "1", "--knn_k", "5", "--output_dir", str(out)])
    return out, result
