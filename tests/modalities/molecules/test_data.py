"""Molecule data: the QM9 fixture, EDM's features and batches, property and atom-count statistics,
SDF/XYZ readers with bad records, and (with qm9pack installed) the full QM9 split."""
import importlib.util

import numpy as np
import pytest
import torch
from multidiff.modalities.molecules import (
    ATOM_SYMBOLS,
    ATOMIC_NUMBERS,
    PROPERTY_NAMES,
    AtomCountDistribution,
    MoleculeDataError,
    MoleculeDataset,
    MoleculeRecord,
    NoConformerError,
    PropertyNormalizer,
    TooManyAtomsError,
    UnknownElementError,
    UnreadableRecordError,
    collate_molecules,
    load_fixture,
    num_atoms_histogram,
    read_molecules,
    split_molecules,
)
from multidiff.modalities.molecules.qm9 import QM9, edm_halves, edm_split_labels

torch.set_num_threads(1)

FIXTURE_MOLECULES, FIXTURE_ATOMS = 300, 5357


@pytest.fixture(scope="module")
def qm9():
    return load_fixture()


@pytest.fixture(scope="module")
def data(qm9):
    return MoleculeDataset.from_qm9(qm9, "all", properties=["alpha", "gap", "mu"])


# -- the fixture ---------------------------------------------------------------------------------

def test_fixture_counts_vocabulary_and_labels(qm9):
    assert len(qm9) == FIXTURE_MOLECULES and int(qm9.num_atoms.sum()) == FIXTURE_ATOMS
    assert qm9.positions.shape == (FIXTURE_ATOMS, 3) and qm9.positions.dtype == torch.float32
    assert set(qm9.types.unique().tolist()) <= set(range(len(ATOM_SYMBOLS)))
    assert ATOM_SYMBOLS == ("H", "C", "N", "O", "F") and ATOMIC_NUMBERS == (1, 6, 7, 8, 9)
    assert 3 <= int(qm9.num_atoms.min()) and int(qm9.num_atoms.max()) <= 29  # QM9: at most 9 heavy atoms, 29 in all
    idx = qm9.index
    assert bool((idx[1:] > idx[:-1]).all()) and 1 <= int(idx.min()) and int(idx.max()) <= 133885
    assert qm9.properties.shape == (FIXTURE_MOLECULES, 6) and bool(torch.isfinite(qm9.properties).all())
    assert set(qm9.split.tolist()) <= {0, 1, 2}
    assert bool(((qm9.half >= 0) == (qm9.split == 0)).all())  # halves cover exactly the training molecules
    assert sum(len(qm9.indices(s)) for s in ("train", "valid", "test")) == FIXTURE_MOLECULES
    assert len(qm9.indices("Ga")) + len(qm9.indices("Gb")) == len(qm9.indices("train"))
    with pytest.raises(ValueError, match="unknown QM9 split 'validation'"):
        qm9.indices("validation")


def test_fixture_atoms_agree_with_smiles_and_units(qm9):
    """Heavy atoms of each record = atoms of its SMILES; hydrogens = RDKit's count; gap = lumo - homo (meV)."""
    from rdkit import Chem

    for i in range(len(qm9)):
        rec = qm9.record(i)
        mol = Chem.MolFromSmiles(rec.smiles)
        heavy = sorted(a.GetSymbol() for a in mol.GetAtoms())
        assert sorted(s for s in rec.symbols if s != "H") == heavy, rec.smiles
        assert rec.symbols.count("H") == sum(a.GetTotalNumHs() for a in mol.GetAtoms()), rec.smiles
        assert int(rec.formal_charges.sum()) == Chem.GetFormalCharge(mol) == 0
        assert sum(1 for c in rec.formal_charges.tolist() if c) == sum(1 for a in mol.GetAtoms() if a.GetFormalCharge())
    p = dict(zip(PROPERTY_NAMES, qm9.properties.double().T))
    # QM9 gives HOMO, LUMO and gap in Hartree to 4 decimals: 0.0001 Ha = 2.72 meV after conversion
    assert float((p["gap"] - (p["lumo"] - p["homo"])).abs().max()) < 2 * 2.73
    assert 4000 < float(p["gap"].mean()) < 10000 and float(p["homo"].max()) < 0  # meV, HOMO below zero
    assert float(p["alpha"].min()) > 5 and float(p["Cv"].min()) > 5 and float(p["mu"].min()) >= 0


def test_cache_file_round_trip(qm9, tmp_path):
    qm9.save(tmp_path / "q.safetensors")
    back = QM9.load(tmp_path / "q.safetensors")
    for name in ("positions", "types", "formal_charges", "num_atoms", "index", "properties", "split", "half"):
        assert torch.equal(getattr(back, name), getattr(qm9, name)), name
    assert back.smiles == qm9.smiles and back.info == qm9.info
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(MoleculeDataError, match="bad.safetensors: not a readable QM9 tensor file"):
        QM9.load(tmp_path / "bad.safetensors")


# -- features and batches -----------------------------------------------------------------------

def test_collate_centres_and_encodes_features(data, qm9):
    b = data.batch(range(len(data)))
    assert b.x.shape == (FIXTURE_ATOMS, 9) and b.batch.shape == (FIXTURE_ATOMS,) and b.x.dtype == torch.float32
    assert b.space.batch_size == FIXTURE_MOLECULES and b.space.com_channels == (0, 1, 2) and b.space.num_features == 9
    assert torch.equal(b.num_atoms, qm9.num_atoms) and b.space.check(b.x) is b.x
    # zero centre of mass per molecule, and positions = stored positions minus their mean (float64 reference)
    assert float(b.space.com(b.x).abs().max()) < 1e-6
    ref = qm9.positions.double()
    ref = ref - torch.zeros(FIXTURE_MOLECULES, 3, dtype=torch.float64).index_add_(0, b.batch, ref)[b.batch] / \
        qm9.num_atoms.double()[b.batch, None]
    assert float((b.x[:, :3].double() - ref).abs().max()) < 1e-5
    # one-hot * 0.25 with exactly one hot entry, atomic number * 0.1 consistent with it
    onehot = b.x[:, 3:8]
    assert set(onehot.unique().tolist()) == {0.0, 0.25} and torch.equal((onehot > 0).sum(1), torch.ones(FIXTURE_ATOMS, dtype=torch.long))
    types = onehot.argmax(1)
    assert torch.equal(types, qm9.types)
    z = torch.tensor(ATOMIC_NUMBERS, dtype=torch.float32)[types]
    assert torch.equal(b.x[:, 8], z * 0.1)


def test_batch_equals_collate_and_split_round_trips(data):
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, len(data), (40,), generator=g)  # repeats allowed
    fast = data.batch(rows)
    slow = collate_molecules([data[int(i)] for i in rows])
    for name in ("x", "batch", "num_atoms", "properties", "formal_charges", "rows"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    parts = split_molecules(fast.x, fast.batch)
    assert len(parts) == 40
    # split returns the batch's own (centred) positions and the original types, bit for bit
    assert torch.equal(torch.cat([p for p, _ in parts]), fast.x[:, :3])
    for (p, t), r in zip(parts, rows.tolist()):
        assert torch.equal(t, data[r]["types"]) and p.shape == (len(t), 3)
    # collating the pieces again: already centred, so only float32 rounding of the re-centring
    again = collate_molecules([{"positions": p, "types": t} for p, t in parts])
    assert torch.equal(again.x[:, 3:], fast.x[:, 3:]) and float((again.x - fast.x).abs().max()) < 1e-6
    b64 = data.batch(rows, dtype=torch.float64)
    assert b64.x.dtype == torch.float64 and float(b64.space.com(b64.x).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="sorted"):
        split_molecules(fast.x, fast.batch.flip(0))


def test_property_normalisation_is_edms_mean_mad(data, qm9):
    raw = qm9.properties[:, [PROPERTY_NAMES.index(p) for p in ("alpha", "gap", "mu")]].double().numpy()
    mean = raw.mean(0)
    mad = np.abs(raw - mean).mean(0)
    norm = data.normalizer
    assert np.allclose(norm.mean.numpy(), mean, rtol=1e-12) and np.allclose(norm.mad.numpy(), mad, rtol=1e-12)
    p = data.batch(range(len(data))).properties
    assert p.shape == (FIXTURE_MOLECULES, 3)
    assert np.allclose(p.double().numpy(), (raw - mean) / mad, atol=1e-5)
    back = PropertyNormalizer.from_config(norm.to_config())
    assert back.names == ("alpha", "gap", "mu") and torch.equal(back.mean, norm.mean) and torch.equal(back.mad, norm.mad)
    assert torch.allclose(norm.denormalize(p.double()), torch.from_numpy(raw), atol=1e-3)
    # a dataset normalised with another set's statistics (EDM: Gb models use the valid split's)
    valid_stats = PropertyNormalizer.from_qm9(qm9, ["alpha", "gap", "mu"], split="valid")
    other = MoleculeDataset.from_qm9(qm9, "train", properties=["alpha", "gap", "mu"], normalizer=valid_stats)
    assert other.normalizer is valid_stats and not torch.allclose(other.normalizer.mean, norm.mean)
    with pytest.raises(ValueError, match="unknown QM9 properties \\['energy'\\]"):
        MoleculeDataset.from_qm9(qm9, "train", properties=["energy"])
    with pytest.raises(ValueError, match="zero spread"):
        PropertyNormalizer.fit(torch.ones(5, 1), ["flat"])


def test_records_dataset_and_missing_property(qm9):
    recs = [qm9.record(i) for i in range(5)]
    ds = MoleculeDataset.from_records(recs, properties=["gap"])
    assert len(ds) == 5 and torch.equal(ds.num_atoms, qm9.num_atoms[:5])
    recs[3] = MoleculeRecord(recs[3].positions, recs[3].types, name="x", source="mine.sdf", record=7)
    with pytest.raises(MoleculeDataError, match="mine.sdf record 7 \\(item 3\\) lacks properties \\['gap'\\]"):
        MoleculeDataset.from_records(recs, properties=["gap"])
    with pytest.raises(UnknownElementError):
        MoleculeRecord(torch.zeros(2, 3), torch.tensor([0, 7]))


# -- atom counts --------------------------------------------------------------------------------

def test_histogram_and_sampler(data, qm9):
    h = data.num_atoms_histogram()
    assert int(h.sum()) == FIXTURE_MOLECULES and h.numel() == int(qm9.num_atoms.max()) + 1
    for n in range(h.numel()):
        assert int(h[n]) == int((qm9.num_atoms == n).sum())
    assert num_atoms_histogram(qm9.num_atoms, max_atoms=29).numel() == 30
    dist = AtomCountDistribution(h)
    n = 200_000
    s = dist.sample(n, torch.Generator().manual_seed(0))
    assert torch.equal(s, dist.sample(n, torch.Generator().manual_seed(0)))
    assert bool((h[s] > 0).all())  # never an atom count absent from the data
    observed = torch.bincount(s, minlength=h.numel()).double()
    expected = dist.probs * n
    support = expected > 0
    chi2 = float((((observed - expected) ** 2)[support] / expected[support]).sum())
    from scipy.stats import chi2 as chi2_dist

    assert chi2 < chi2_dist.ppf(0.999, int(support.sum()) - 1), chi2
    assert AtomCountDistribution.from_config(dist.to_config()).histogram.tolist() == h.double().tolist()
    assert float(dist.log_prob(torch.tensor([0]))) == float("-inf")
    with pytest.raises(ValueError, match="more than max_atoms = 10"):
        num_atoms_histogram(qm9.num_atoms, max_atoms=10)


# -- files --------------------------------------------------------------------------------------

def _sdf_block(smiles: str, seed: int = 0, two_d: bool = False) -> str:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    if two_d:
        AllChem.Compute2DCoords(mol)
    else:
        AllChem.EmbedMolecule(mol, randomSeed=seed)
    mol.SetProp("_Name", smiles)
    mol.SetProp("gap", "123.5")
    return Chem.MolToMolBlock(mol) + "> <gap>\n123.5\n\n$$$$\n"


def test_sdf_reader_good_and_bad_records(tmp_path):
    good = _sdf_block("CCO")
    corrupt = "\n".join(ln if i != 5 else "this is not an atom line" for i, ln in enumerate(_sdf_block("CN").splitlines())) + "\n"
    chlorine = _sdf_block("CCl")
    flat = _sdf_block("C=O", two_d=True)
    big = _sdf_block("CCCCCCCC")  # 26 atoms
    path = tmp_path / "mixed.sdf"
    path.write_text(good + corrupt + chlorine + flat + big + good)
    with pytest.warns(UserWarning, match="skipped 4 of 6 records"):
        res = read_molecules(path, on_error="skip", max_atoms=20)
    assert len(res) == 2 and [r.record for r in res] == [0, 5]
    assert res[0].symbols == ["C", "C", "O"] + ["H"] * 6 and res[0].properties["gap"] == 123.5 and res[0].name == "CCO"
    reasons = {s.record: (s.kind, s.reason) for s in res.skipped}
    assert set(reasons) == {1, 2, 3, 4} and all(s.path == str(path) for s in res.skipped)
    assert reasons[1][0] == "UnreadableRecordError" and "unreadable record" in reasons[1][1]
    assert reasons[2][0] == "UnknownElementError" and "['Cl']" in reasons[2][1]
    assert reasons[3][0] == "NoConformerError" and "2D" in reasons[3][1]
    assert reasons[4][0] == "TooManyAtomsError" and "26 atoms" in reasons[4][1]
    assert "4 skipped" in res.report() and "record 2:" in res.report()
    expected = {1: UnreadableRecordError, 2: UnknownElementError, 3: NoConformerError, 4: TooManyAtomsError}
    for k, cls in expected.items():
        p = tmp_path / f"one_bad_{k}.sdf"
        p.write_text(good + [good, corrupt, chlorine, flat, big][k])
        with pytest.raises(cls, match=f"one_bad_{k}.sdf, record 1 ") as err:
            read_molecules(p, max_atoms=20)
        assert err.value.record == 1 and err.value.path == str(p)
    for name in ("empty.sdf", "empty.xyz"):  # a file-level failure: nothing to skip, always an error
        (tmp_path / name).write_text("")
        with pytest.raises(MoleculeDataError, match=f"{name}: the file is empty"):
            read_molecules(tmp_path / name, on_error="skip")


def test_xyz_reader_good_and_bad_records(tmp_path, qm9):
    from multidiff.modalities.molecules import write_xyz

    recs = [qm9.record(i) for i in range(3)]
    write_xyz(recs, tmp_path / "good.xyz")
    res = read_molecules(tmp_path / "good.xyz")
    assert len(res) == 3 and not res.skipped
    for r, back in zip(recs, res):
        assert torch.equal(back.types, r.types) and float((back.positions - r.positions).abs().max()) < 1e-6
    good = (tmp_path / "good.xyz").read_text()
    frames = {
        "bad_line": "2\nwater?\nO 0 0 0\nH 0.9 zero 0\n",
        "element": "2\nHCl\nH 0 0 0\nCl 1.3 0 0\n",
        "big": "4\nmethane minus one\nC 0 0 0\nH 1 0 0\nH 0 1 0\nH 0 0 1\n",
    }
    path = tmp_path / "mixed.xyz"
    # frame 0 has a bad number, 1-3 are good, 4 has chlorine, 5 is fine (4 atoms), 6 has no atom
    # count (reading stops there: the frame after it is never reached)
    path.write_text(frames["bad_line"] + good + frames["element"] + frames["big"] + "three\ncomment\n" + good)
    with pytest.warns(UserWarning, match="skipped 3 of 7 records"):
        res = read_molecules(path, on_error="skip")
    assert [r.record for r in res] == [1, 2, 3, 5]
    assert {s.record: s.kind for s in res.skipped} == {0: "UnreadableRecordError", 4: "UnknownElementError",
                                                        6: "UnreadableRecordError"}
    assert "line 4" in res.skipped[0].reason and "['Cl']" in res.skipped[1].reason
    assert "reading stopped" in res.skipped[2].reason
    big = tmp_path / "big.xyz"
    big.write_text("1\nan H atom\nH 0 0 0\n" + frames["big"])
    with pytest.raises(TooManyAtomsError, match="big.xyz, record 1 \\(counting from 0\\): 4 atoms, more than max_atoms = 3"):
        read_molecules(big, max_atoms=3)
    truncated = tmp_path / "truncated.xyz"
    truncated.write_text("5\ncut short\nC 0 0 0\nH 1 0 0\n")
    with pytest.raises(UnreadableRecordError, match="truncated.xyz, record 0 .*truncated"):
        read_molecules(truncated)
    with pytest.raises(UnreadableRecordError, match="mixed.xyz, record 0 \\(counting from 0\\): line 4"):
        read_molecules(path)
    with pytest.raises(MoleculeDataError, match="unknown molecule file type '.pdb'"):
        read_molecules(tmp_path / "m.pdb")
    with pytest.raises(ValueError, match="unknown on_error 'ignore'"):
        read_molecules(path, on_error="ignore")


# -- full QM9 (only with the optional qm9pack installed) -----------------------------------------

# not pytest.importorskip: qm9pack's own import fails on current setuptools; its data files are what count
@pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None,
                    reason="the optional qm9pack package (the [data] extra, a data set, never a test dependency) is not installed")
def test_full_qm9_split_matches_edm(tmp_path_factory, qm9):
    from multidiff.modalities.molecules import load_qm9

    cache = tmp_path_factory.mktemp("cache")
    full = load_qm9(cache)
    assert (cache / "molecules" / "qm9_v1.safetensors").is_file()
    assert len(full) == 130_831 and full.info["formal_charge_mismatches"] == 0
    sizes = {s: len(full.indices(s)) for s in ("train", "valid", "test", "Ga", "Gb")}
    assert sizes == {"train": 100_000, "valid": 17_748, "test": 13_083, "Ga": 50_000, "Gb": 50_000}
    assert np.array_equal(edm_split_labels(len(full)), full.split.numpy())  # deterministic
    assert np.array_equal(edm_halves(full.split.numpy()), full.half.numpy())
    # EDM's configs/datasets_config.py lists its training split's atom-count histogram and atom-type
    # counts: equal numbers mean the same 100,000 molecules (a different split would not match)
    edm_n_nodes = {22: 3393, 17: 13025, 23: 4848, 21: 9970, 19: 13832, 20: 9482, 16: 10644, 13: 3060, 15: 7796,
                   25: 1506, 18: 13364, 12: 1689, 11: 807, 24: 539, 14: 5136, 26: 48, 7: 16, 10: 362, 8: 49,
                   9: 124, 27: 266, 4: 4, 29: 25, 6: 9, 5: 5, 3: 1}
    train = full.dataset("train")
    h = train.num_atoms_histogram()
    assert {n: int(c) for n, c in enumerate(h.tolist()) if c} == edm_n_nodes
    assert torch.bincount(train.types).tolist() == [923537, 635559, 101476, 140202, 2323]
    # the fixture is a subset with the same labels
    rows = torch.searchsorted(full.index, qm9.index)
    assert torch.equal(full.index[rows], qm9.index) and torch.equal(full.split[rows], qm9.split)
    assert torch.equal(full.half[rows], qm9.half) and torch.equal(full.positions[full.atom_rows(rows)], qm9.positions)
    # a second call reads the cache
    again = load_qm9(cache)
    assert torch.equal(again.positions, full.positions) and again.smiles == full.smiles


def test_missing_qm9pack_is_a_clear_import_error(tmp_path, monkeypatch):
    import importlib.util as iu

    from multidiff.modalities.molecules import QM9NotInstalledError, load_qm9

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "qm9pack" else real(name, *a))
    with pytest.raises(QM9NotInstalledError, match=r"pip install 'multidiff-toolkit\[data\]'") as err:
        load_qm9(tmp_path)
    assert isinstance(err.value, ImportError)
    assert not (tmp_path / "molecules").exists() or not any((tmp_path / "molecules").iterdir())


def test_export_for_edms_loader(qm9, tmp_path):
    from multidiff.modalities.molecules.qm9 import export_edm_npz

    paths = export_edm_npz(qm9, tmp_path / "qm9")
    total = 0
    for split, code in (("train", 0), ("valid", 1), ("test", 2)):
        with np.load(paths[split]) as f:
            rows = qm9.indices(split)
            assert f["positions"].shape == (len(rows), 29, 3) and f["charges"].shape == (len(rows), 29)
            assert np.array_equal(f["num_atoms"], qm9.num_atoms[rows].numpy())
            assert np.array_equal((f["charges"] > 0).sum(1), f["num_atoms"])  # padding is zero
            n0 = int(f["num_atoms"][0])
            z = np.array(ATOMIC_NUMBERS)[qm9.types[: int(qm9.offsets[-1])].numpy()]
            s = int(qm9.offsets[int(rows[0])])
            assert np.array_equal(f["charges"][0, :n0], z[s:s + n0])
            assert np.array_equal(f["positions"][0, :n0], qm9.positions[s:s + n0].numpy())
            # raw QM9 units: gap in Hartree (EDM's loader multiplies by 27.2114 itself)
            gap = qm9.properties[rows, PROPERTY_NAMES.index("gap")].double().numpy()
            assert np.allclose(f["gap"] * 27211.4, gap, rtol=1e-6) and 0.05 < f["gap"].mean() < 0.5
            total += len(rows)
    assert total == len(qm9)
