"""E_hull of predicted energies against the DFT reference hull and the all-model hull."""

from __future__ import annotations

import json

import pytest
from pymatgen.core import Composition
from pymatgen.core.entries import ComputedEntry

from pipeline.frames import RecordError
from pipeline.hull import (
    GGA_GGA_U,
    GGA_GGA_U_R2SCAN,
    R2SCAN,
    RAW,
    build_reference_hull,
    correct_like_reference,
    e_above_hull,
    mixed_e_above_hull,
    model_reference_hull,
    prediction_entry,
)
from pipeline.sources.files.res import read_res_entries


def _raw(formula: str, e_per_atom: float, entry_id: str) -> ComputedEntry:
    comp = Composition(formula)
    return ComputedEntry(comp, e_per_atom * comp.num_atoms, entry_id=entry_id, data={"fidelity": "gpaw-pbe"})


@pytest.fixture()
def li_al_hull():
    """A made-up gpaw-pbe Li-Al hull: LiAl stable (-0.30 eV/atom formation), Li3Al2 above it."""
    entries = [_raw("Li", -1.9, "li"), _raw("Al", -3.7, "al"), _raw("LiAl", -3.1, "lial"),
               _raw("Li3Al2", -2.8, "li3al2")]
    return build_reference_hull(entries, RAW, fidelity="gpaw-pbe")


def test_both_hulls_and_the_consistent_scale(li_al_hull):
    # The model is systematically 0.2 eV/atom too low everywhere: the DFT-hull E_hull is off by 0.2,
    # the all-model hull cancels it.
    shift = -0.2
    model = {e.entry_id: e.energy + shift * e.composition.num_atoms for e in li_al_hull.entries}
    cand = prediction_entry("c1", "LiAl3", energy_per_atom=-3.55 + shift)  # DFT truth would be -3.55
    hull_at = li_al_hull.diagram.get_hull_energy_per_atom(Composition("LiAl3"))
    [row] = e_above_hull([cand], li_al_hull, model_energies=model, fidelity="gpaw-pbe")
    assert row["error"] is None and row["fidelity"] == "gpaw-pbe" and row["thermo_type"] == RAW
    assert row["e_hull_pred_dft_hull"] == pytest.approx(-3.55 + shift - hull_at)
    assert row["e_hull_pred_model_hull"] == pytest.approx(-3.55 - hull_at)
    assert set(json.loads(row["decomposition_dft_hull"])) == {"al", "lial"}
    assert sum(json.loads(row["decomposition_model_hull"]).values()) == pytest.approx(1.0)


def test_below_hull_is_negative_and_stable_reference_is_zero(li_al_hull):
    rows = e_above_hull([prediction_entry("new", "LiAl", energy_per_atom=-3.2),
                         prediction_entry("same", "Li2Al2", energy_per_atom=-3.1)], li_al_hull)
    assert rows[0]["e_hull_pred_dft_hull"] == pytest.approx(-0.1)
    assert rows[1]["e_hull_pred_dft_hull"] == pytest.approx(0.0, abs=1e-12)
    assert rows[0]["e_hull_pred_model_hull"] is None  # no model energies given: no all-model hull


def test_bad_candidates_keep_their_rows(li_al_hull):
    rows = e_above_hull([prediction_entry("ok", "LiAl", energy_per_atom=-3.0),
                         prediction_entry("alien", "LiFe", energy_per_atom=-3.0)], li_al_hull)
    assert rows[0]["error"] is None
    assert "Fe" in rows[1]["error"] and rows[1]["e_hull_pred_dft_hull"] is None


def test_input_errors(li_al_hull):
    with pytest.raises(RecordError, match="fidelity"):
        e_above_hull([], li_al_hull, fidelity="gpaw-r2scan")
    with pytest.raises(RecordError, match="exactly one"):
        prediction_entry("x", "LiAl", energy=1.0, energy_per_atom=1.0)
    with pytest.raises(RecordError, match="NaN"):
        prediction_entry("x", "LiAl", energy=float("nan"))
    with pytest.raises(RecordError, match="elemental reference"):
        model_reference_hull(li_al_hull, {"lial": -6.0, "li": -1.9})
    with pytest.raises(RecordError, match="not in the reference"):
        model_reference_hull(li_al_hull, {"zzz": -6.0})


@pytest.fixture(scope="module")
def li_ni_o(mp_file):
    return read_res_entries(mp_file("mp-res_Li-Ni-O/Li-Ni-O.res.tar"))[0]


@pytest.mark.shared_data
def test_mp_reference_phase_as_a_prediction_lands_where_mp_puts_it(li_ni_o):
    """A 'prediction' equal to a DFT raw energy, without any parameters, gets MP2020 corrections (U, oxide)
    identical to the reference entry's: E_hull matches the reference's own."""
    hull = build_reference_hull(li_ni_o, GGA_GGA_U)
    by_id = {e.entry_id: e for e in hull.entries}
    ids = ["mp-19009-GGA+U", "mp-556550-GGA+U", "mp-841-GGA", "mp-19308-GGA+U"]
    preds = [prediction_entry(i, by_id[i].structure, energy=by_id[i].uncorrected_energy) for i in ids]
    rows = e_above_hull(preds, hull, fidelity="pbe")
    for i, row in zip(ids, rows, strict=True):
        assert row["error"] is None, row["error"]
        assert row["correction"] == pytest.approx(by_id[i].correction, abs=1e-9)
        assert row["e_hull_pred_dft_hull"] == pytest.approx(hull.diagram.get_e_above_hull(by_id[i]), abs=1e-9)
    assert rows[0]["e_hull_pred_dft_hull"] == pytest.approx(0.0, abs=1e-9)
    assert rows[-1]["e_hull_pred_dft_hull"] > 0


@pytest.mark.shared_data
def test_r2scan_predictions_are_uncorrected_and_model_hull_of_dft_is_dft(li_ni_o):
    hull = build_reference_hull(li_ni_o, R2SCAN)
    dft_as_model = {e.entry_id: e.uncorrected_energy for e in hull.entries}
    nio = next(e for e in hull.entries if e.entry_id == "mp-19009-R2SCAN")
    [row] = e_above_hull([prediction_entry("nio", nio.structure, energy=nio.energy + 0.1 * len(nio.structure))],
                         hull, model_energies=dft_as_model)
    assert row["correction"] == 0
    assert row["e_hull_pred_dft_hull"] == pytest.approx(0.1) and row["e_hull_pred_model_hull"] == pytest.approx(0.1)


@pytest.mark.shared_data
@pytest.mark.parametrize("chemsys", ["Li", "Ni", "O", "Li-Ni", "Li-O", "Ni-O", "Li-Ni-O"])
def test_gga_stable_phase_at_its_own_gga_energy_is_on_the_mixed_hull(li_ni_o, chemsys):
    """pymatgen puts the mixed hull on the r2SCAN scale when every GGA ground state has an r2SCAN entry (Li, Ni,
    Li-Ni here) and on the GGA scale otherwise: a PBE prediction must land right in both cases."""
    mixed = build_reference_hull(li_ni_o, GGA_GGA_U_R2SCAN, chemsys=chemsys)
    gga = build_reference_hull(li_ni_o, GGA_GGA_U, chemsys=chemsys)
    stable = [e for e in gga.entries if str(e.entry_id) in gga.stable_entry_ids()]
    assert stable
    preds = [prediction_entry(e.entry_id, e.structure, energy=e.uncorrected_energy) for e in stable]
    for row in e_above_hull(preds, mixed, fidelity="pbe"):
        assert row["error"] is None, row["error"]
        assert row["e_hull_pred_dft_hull"] == pytest.approx(0.0, abs=1e-6), (chemsys, row["candidate_id"])
    assert mixed.scale == ("r2scan" if chemsys in ("Li", "Ni", "Li-Ni") else "pbe")


@pytest.mark.shared_data
@pytest.mark.parametrize("chemsys", ["Li", "Li-O"])
def test_both_heads_at_dft_energies_reproduce_the_mixing_scheme(li_ni_o, chemsys):
    """Every reference material 'predicted' at its own GGA and r2SCAN raw energies gets the E_hull that pymatgen's
    mixing scheme gives its surviving entry (r2SCAN scale: Li; GGA scale with shifted r2SCAN entries: Li-O), and
    the all-model hull built from the same energies is the DFT hull."""
    mixed = build_reference_hull(li_ni_o, GGA_GGA_U_R2SCAN, chemsys=chemsys)
    raw = {str(e.entry_id): e for e in mixed.mixing.inputs}
    kept = {str(e.entry_id): e for e in mixed.entries}
    pairs = [(g, r) for g, r in mixed.mixing.pairs() if g and r and r in kept]
    assert len(pairs) >= 5
    pbe = [prediction_entry(g, raw[g].structure, energy=raw[g].energy) for g, _ in pairs]
    r2 = [prediction_entry(g, raw[r].structure, energy=raw[r].energy) for g, r in pairs]
    model = {i: e.energy for i, e in raw.items()}
    rows = mixed_e_above_hull(pbe, r2, mixed, model_energies=model)
    for (_, r), row in zip(pairs, rows, strict=True):
        want = mixed.diagram.get_e_above_hull(kept[r], allow_negative=True)
        assert row["error"] is None, row["error"]
        assert row["fidelity"] == "pbe+r2scan"
        assert row["e_hull_pred_dft_hull"] == pytest.approx(want, abs=1e-6), row["candidate_id"]
        assert row["e_hull_pred_model_hull"] == pytest.approx(want, abs=1e-6), row["candidate_id"]


@pytest.mark.shared_data
def test_mixed_model_hull_moves_with_the_model(li_ni_o):
    """Model energies of the references 0.1 eV/atom higher everywhere: the all-model mixed hull moves with them,
    so a candidate at DFT energies sits 0.1 eV/atom below it, while the DFT-hull value is unchanged."""
    mixed = build_reference_hull(li_ni_o, GGA_GGA_U_R2SCAN, chemsys="Li-O")
    model = {str(e.entry_id): e.energy + 0.1 * len(e.structure) for e in mixed.mixing.inputs}
    li2o = next(e for e in mixed.mixing.inputs if e.entry_id == "mp-1960-GGA")
    li2o_r2 = next(e for e in mixed.mixing.inputs if e.entry_id == "mp-1960-R2SCAN")
    [row] = mixed_e_above_hull([prediction_entry("c", li2o.structure, energy=li2o.energy)],
                               [prediction_entry("c", li2o_r2.structure, energy=li2o_r2.energy)], mixed,
                               model_energies=model)
    assert row["e_hull_pred_dft_hull"] == pytest.approx(0.0, abs=1e-6)
    assert row["e_hull_pred_model_hull"] == pytest.approx(-0.1, abs=1e-6)
    with pytest.raises(RecordError, match="not in the reference"):
        model_reference_hull(mixed, {"zzz": -1.0})
    # the GGA-scale value of a PBE-only prediction (mp-1960 GGA raw energy of MP's example file)
    li2o_gga = prediction_entry("li2o", "Li2O", energy=-14.263600)
    assert correct_like_reference(li2o_gga, GGA_GGA_U_R2SCAN).energy == pytest.approx(-14.950600, abs=1e-6)
    [row] = e_above_hull([li2o_gga], mixed)
    assert row["e_hull_pred_dft_hull"] == pytest.approx(0.0, abs=1e-6)
