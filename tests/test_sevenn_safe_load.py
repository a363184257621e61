"""Untrusted SevenNet files never run code: crafted pickles are refused, the shipped MF-0 still loads."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.model.sevenn_import import load_sevenn_checkpoint


class _Payload:
    """Unpickling this calls os.system: the attack of defect 1 (a crafted .pth)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"config": {}, "model_state_dict": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match=r"evil.pth: refused, it names the global .*system"):
        load_sevenn_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_broken_files_give_one_line_errors(tmp_path, content):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="bad.pth: not a readable torch checkpoint") as info:
        load_sevenn_checkpoint(bad)
    assert "\n" not in str(info.value)


def test_a_plain_dict_is_not_a_sevenn_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a SevenNet checkpoint"):
        load_sevenn_checkpoint(path)


def test_the_shipped_mf0_still_loads_with_the_allow_list():
    pytest.importorskip("sevenn")
    from pipeline.model.sevenn_import import sevenn_checkpoint_path

    raw = load_sevenn_checkpoint(sevenn_checkpoint_path("7net-mf-0"))
    assert raw["config"]["use_modality"] and "model_state_dict" in raw
