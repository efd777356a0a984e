"""The molecule modality end to end on the committed fixture: a few training steps, checkpoint,
sampling with several solvers, RDKit out, metrics, files; bad requests."""
import pytest
import torch

from multidiff.pipeline import DiffusionPipeline, train
from multidiff.registry import available_modalities, get_modality


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qm9")
    m = get_modality("molecules")
    c = m.default_config()
    c.data["name"] = "fixture"
    c.model.update(hidden=16, num_layers=1)
    c.run.out_dir, c.run.steps, c.run.batch_size, c.run.ckpt_every = str(out), 3, 8, 3
    c.run.progress = c.run.tensorboard = False
    train(m, c)
    return out


def test_molecules_is_registered():
    assert "molecules" in available_modalities()


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "ancestral"])
def test_sampling_gives_rdkit_molecules_with_zero_com(run_dir, solver):
    pipe = DiffusionPipeline.load(run_dir)
    chunks = pipe.sample_tensors(5, solver=solver, nfe=5, generator=torch.Generator().manual_seed(0))
    x, space, _ = chunks[0]
    # float32 state: the centre of mass is zero up to rounding of the coordinates' magnitude
    assert space.com(x).abs().max() < 1e-6 * (1 + x[:, :3].abs().max()) * 10
    mols = pipe.modality.decode(x, space, pipe.config)
    assert len(mols) == 5 and all(m.GetNumConformers() == 1 for m in mols)
    assert sum(m.GetNumAtoms() for m in mols) == x.shape[0]


def test_atom_counts_from_the_histogram_and_given(run_dir):
    pipe = DiffusionPipeline.load(run_dir)
    hist = torch.tensor(pipe.config.data["num_atoms_histogram"])
    counts = pipe.modality.atom_counts(pipe.config, 2000, generator=torch.Generator().manual_seed(0))
    assert bool((hist[counts] > 0).all()), "drew an atom count the training set never had"
    mols = pipe.sample(3, nfe=3, n_atoms=[4, 9, 12], generator=torch.Generator().manual_seed(0))
    assert [m.GetNumAtoms() for m in mols] == [4, 9, 12]
    with pytest.raises(ValueError, match="n_atoms 99 of molecule 0 is out of range"):
        pipe.sample(1, nfe=3, n_atoms=99)
    with pytest.raises(ValueError, match="not trained on the properties"):
        pipe.sample(1, nfe=3, properties={"gap": 0.2})


def test_metrics_and_files(run_dir, tmp_path):
    pipe = DiffusionPipeline.load(run_dir)
    mols = pipe.sample(6, nfe=4, generator=torch.Generator().manual_seed(1))
    metrics = pipe.evaluate(mols)
    for key in ("atom_stability", "molecule_stability", "validity", "uniqueness"):
        assert 0.0 <= metrics[key] <= 1.0
    paths = pipe.save(mols, tmp_path / "out", picture=True)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert (tmp_path / "out" / "molecules.sdf").read_text().count("$$$$") == 6


def test_molecule_diffusion_api(run_dir, tmp_path):
    from multidiff.modalities.molecules import MoleculeDiffusion

    model = MoleculeDiffusion.load(run_dir)
    mols = model.generate(4, nfe=4, n_atoms=6, generator=torch.Generator().manual_seed(0))
    assert len(mols) == 4 and all(m.GetNumAtoms() == 6 for m in mols)
    path = model.write_sdf(mols, tmp_path / "out.sdf")
    assert path.read_text().count("$$$$") == 4
    assert set(model.evaluate(mols)) >= {"atom_stability", "molecule_stability", "validity"}


def test_fragment_inpainting_keeps_types_and_relative_coordinates(run_dir):
    """Every molecule grown around a fragment contains it exactly: same elements, and the same
    coordinates up to one translation (the fragment is centred; the generated atoms absorb the
    centre-of-mass constraint)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from multidiff.modalities.molecules import MoleculeDiffusion

    frag = Chem.AddHs(Chem.MolFromSmiles("CO"))
    AllChem.EmbedMolecule(frag, randomSeed=0)
    ref = torch.tensor(frag.GetConformer().GetPositions(), dtype=torch.float32)
    model = MoleculeDiffusion.load(run_dir)
    k = frag.GetNumAtoms()
    for solver in ("ddim", "dpmpp_2m"):
        mols = model.generate(3, nfe=6, solver=solver, fragment=frag, n_atoms=[k + 2, k + 5, k],
                              generator=torch.Generator().manual_seed(0))
        for mol in mols:
            got = torch.tensor(mol.GetConformer().GetPositions(), dtype=torch.float32)[:k]
            assert [a.GetSymbol() for a in mol.GetAtoms()][:k] == [a.GetSymbol() for a in frag.GetAtoms()]
            torch.testing.assert_close(got - got.mean(0), ref - ref.mean(0), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="fragment has 6 atoms but molecule 0 has only 4"):
        model.generate(1, nfe=3, fragment=frag, n_atoms=4)
