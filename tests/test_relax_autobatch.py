"""The batch budget of the batched relaxer (pipeline.relax.autobatch): the arithmetic, the CUDA branch with
mocked memory functions, the CPU branch on this machine, and the relaxer keeping to the budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import bulk

from pipeline.model import ElementReferences, MFPotential, preset
from pipeline.relax import autobatch, batched
from pipeline.relax.autobatch import BatchBudget, budget_from_probes, estimate_batch_budget
from pipeline.relax.calculator import MFPotentialCalculator
from pipeline.relax.relaxer import RelaxSettings, relax_many

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = preset("small", elements=("Li", "Ni", "O"), fidelities=("r2scan",))
    return MFPotential(cfg, ElementReferences({"r2scan": {"Li": -2.0, "Ni": -5.0, "O": -4.0}})).eval()


def _structures(n=12):
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        a = bulk("NiO", "rocksalt", a=4.17, cubic=True) * (1, 1, 1 + k % 2)
        a.symbols[0] = "Li"
        a.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(a)
    return out


def test_budget_arithmetic_is_safe_for_any_split_between_atoms_and_edges():
    """Probes of one composition (40 edges per atom) under a true memory of c + alpha*A + beta*E: the budget keeps
    every batch within the usable memory, whatever its edges per atom, and reaches it at the corner."""
    c, alpha, beta = 3e8, 2e5, 5e3
    probes = [(a, 40 * a, c + alpha * a + beta * 40 * a) for a in (256, 1024)]
    free, fraction = 80e9, 0.8
    b = budget_from_probes(probes, int(free), fraction, device="cuda:0", method="cuda-peak")
    per_atom = alpha + 40 * beta
    assert b.bytes_per_atom == pytest.approx(per_atom) and b.intercept_bytes == pytest.approx(c)
    assert b.max_atoms == int((fraction * free - c) // per_atom)
    assert b.max_edges == int((fraction * free - c) // (per_atom / 40))
    usable = fraction * free
    rng = np.random.default_rng(1)
    for _ in range(1000):  # any batch inside both bounds fits
        atoms = rng.integers(1, b.max_atoms + 1)
        edges = rng.integers(0, b.max_edges + 1)
        assert c + alpha * atoms + beta * edges <= usable * (1 + 1e-9)
    assert c + alpha * b.max_atoms + beta * b.max_edges == pytest.approx(usable, rel=1e-4)
    assert b.limited_by == "memory"
    capped = budget_from_probes(probes, int(free), fraction, device="cpu", method="cpu-peak-rss", cap_atoms=512)
    assert capped.max_atoms == 512 and capped.limited_by == "cap"


def test_budget_without_measurable_growth_charges_the_whole_peak():
    b = budget_from_probes([(24, 900, 3e6), (72, 2700, 2e6)], 10**9, 0.5, device="cpu", method="cpu-peak-rss",
                           noise_bytes=16e6)
    assert b.bytes_per_atom == pytest.approx(16e6 / 72) and b.intercept_bytes == 0.0
    assert b.max_atoms == int(0.5e9 // (16e6 / 72))
    with pytest.raises(ValueError, match="differ in size"):
        budget_from_probes([(24, 1, 1.0), (24, 1, 2.0)], 10**9, 0.5, device="cpu", method="x")


def test_budget_smaller_than_the_largest_structure_still_runs_it_alone(caplog):
    b = budget_from_probes([(10, 100, 1e6), (20, 200, 2e6)], 10**6, 0.5, device="cuda:0", method="cuda-peak",
                           min_atoms=16)
    assert b.max_atoms == 5
    assert "runs alone" in caplog.text


class _FakeCuda:
    """torch.cuda's memory functions for a device with ``free`` bytes where a call costs
    ``base + per_atom * atoms + per_edge * edges`` above what is allocated."""

    def __init__(self, free, base, per_atom, per_edge):
        self.free, self.base, self.per_atom, self.per_edge = free, base, per_atom, per_edge
        self.graph = None
        self.sizes = []
        self.resets = 0

    def synchronize(self, device=None):
        pass

    def empty_cache(self):
        pass

    def memory_allocated(self, device=None):
        return 10**9  # weights and whatever else is resident: must cancel

    def reset_peak_memory_stats(self, device=None):
        self.resets += 1

    def max_memory_allocated(self, device=None):
        g = self.graph
        return 10**9 + self.base + self.per_atom * g.num_atoms + self.per_edge * g.num_edges

    def mem_get_info(self, device=None):
        return self.free, 2 * self.free


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda(free=4 * 10**9, base=2e8, per_atom=3e5, per_edge=2e3)
    for name in ("synchronize", "empty_cache", "memory_allocated", "reset_peak_memory_stats",
                 "max_memory_allocated", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(autobatch, "_device_kind", lambda device: "cuda")
    real_call = autobatch._call

    def call(model, graph):
        fake.graph = graph
        fake.sizes.append((graph.num_atoms, graph.num_edges))
        real_call(model, graph)

    monkeypatch.setattr(autobatch, "_call", call)
    return fake


def test_cuda_branch_with_mocked_memory(model, fake_cuda):
    structures = _structures()
    b = estimate_batch_budget(structures, model, 0, probe_atoms=(32, 96))
    assert b.method == "cuda-peak" and b.fraction == 0.8 and b.free_bytes == fake_cuda.free
    assert fake_cuda.resets == 2  # one peak per probe
    (a1, e1), (a2, e2) = fake_cuda.sizes
    assert a1 >= 32 and a2 >= 96
    per_atom = fake_cuda.per_atom + fake_cuda.per_edge * (e2 - e1) / (a2 - a1)
    assert b.bytes_per_atom == pytest.approx(per_atom, rel=1e-6)
    assert b.intercept_bytes == pytest.approx(fake_cuda.base, rel=1e-3)
    assert b.max_atoms == pytest.approx((0.8 * fake_cuda.free - fake_cuda.base) / per_atom, abs=2)
    assert b.limited_by == "memory"  # no cap on CUDA: 4 GB / ~0.4 MB per atom
    assert b.max_atoms > autobatch.CPU_MAX_ATOMS


def test_relaxer_keeps_to_the_measured_budget_and_records_it(model, fake_cuda, monkeypatch):
    """relax_many with max_atoms='auto': the budget measured (mocked CUDA, little free memory) bounds every
    batch the model sees, and the relaxation rows record it next to the settings (not in the key)."""
    fake_cuda.free = int((fake_cuda.base + 20 * (fake_cuda.per_atom + 60 * fake_cuda.per_edge)) / 0.8)
    sizes = []
    real_evaluate = batched._evaluate

    def spy(model_, graph):
        sizes.append((graph.num_atoms, graph.num_edges))
        return real_evaluate(model_, graph)

    monkeypatch.setattr(batched, "_evaluate", spy)
    items = [(f"s{k}", a) for k, a in enumerate(_structures())]
    calc = MFPotentialCalculator(model, "r2scan")
    table = relax_many(items, calc, RelaxSettings(steps=3, max_atoms="auto"))
    rows = table.to_pylist()
    batch = json.loads(rows[0]["settings"])["batch"]
    assert batch["method"] == "cuda-peak" and batch["max_atoms"] < 30
    assert max(a for a, _ in sizes) <= batch["max_atoms"]
    assert max(e for _, e in sizes) <= batch["max_edges"]
    assert len(rows) == 12 and {r["status"] for r in rows} <= {"converged", "not_converged"}
    fixed = relax_many(items, calc, RelaxSettings(steps=3, max_atoms=512)).to_pylist()
    assert [r["relax_key"] for r in fixed] == [r["relax_key"] for r in rows]  # the budget is not in the key


def test_cpu_branch_measures_this_machine(model):
    b = estimate_batch_budget(_structures(), model, 0)
    assert b.method == "cpu-peak-rss" and b.bytes_per_atom > 0 and b.free_bytes > 0
    assert 1 <= b.max_atoms <= autobatch.CPU_MAX_ATOMS
    tight = estimate_batch_budget(_structures(), model, 0, free_fn=lambda: 2 * 10**8)
    expected = int((0.5 * 2e8 - tight.intercept_bytes) // tight.bytes_per_atom)
    assert tight.free_bytes == 2 * 10**8 and tight.max_atoms == min(max(expected, 1), autobatch.CPU_MAX_ATOMS)


def test_small_runs_and_unmeasurable_devices(model):
    small = estimate_batch_budget(_structures(3), model, 0)
    assert isinstance(small, BatchBudget) and small.method == "all-fit"
    assert small.max_atoms == sum(len(a) for a in _structures(3))

    def broken():
        raise OSError("no /proc here")

    b = estimate_batch_budget(_structures(), model, 0, free_fn=broken)
    assert b.method == "cpu-cap" and b.max_atoms == autobatch.CPU_MAX_ATOMS


def test_settings_accept_auto_or_a_positive_integer():
    assert RelaxSettings().max_atoms == "auto"
    for bad in ("big", 0, -3, True):
        with pytest.raises(ValueError, match="max_atoms"):
            RelaxSettings(max_atoms=bad)
    with pytest.raises(ValueError, match="max_edges"):
        RelaxSettings(max_edges=0)


def test_cli_batch_atoms_takes_auto_or_a_positive_integer():
    import argparse

    from pipeline.cli_args import int_or_auto

    parse = int_or_auto(1)
    assert parse("auto") == "auto" and parse(" AUTO ") == "auto" and parse("96") == 96
    for bad in ("0", "-1", "many", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_structures_the_relaxer_rejects_do_not_spoil_the_measurement(model):
    """Unknown elements, NaN positions and a flat cell fail in the relaxer (as rows); the budget is measured on
    the rest rather than falling back to the cap."""
    from ase import Atoms

    bad = [Atoms("Au", cell=np.eye(3) * 3, pbc=True), Atoms("Li", positions=[[np.nan, 0, 0]], cell=np.eye(3) * 3,
                                                               pbc=True),
           Atoms("LiO", positions=[[0, 0, 0], [1, 0, 0]], cell=[[2, 0, 0], [0, 2, 0], [0, 0, 0]], pbc=True)]
    b = estimate_batch_budget(bad + _structures(), model, 0)
    assert b.method == "cpu-peak-rss"
