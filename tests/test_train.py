"""fastlayers.train (loops, CLI, fine-tuning, compare-torch, DDP), summary and __main__."""
import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from fastlayers.__main__ import main as cli
from fastlayers.models import fastlayers_status, get_model
from fastlayers.summary import main as summary_main
from fastlayers.summary import summarize
from fastlayers.train import evaluate, load_state_dict_file, main as train_main, train_one_epoch

FL_OK, FL_WHY = fastlayers_status()
needs_fl = pytest.mark.skipif(not FL_OK, reason=FL_WHY)
FAST = ["--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Probe(torch.nn.Module):
    """Records the mode and grad state it was called in."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled()))
        return self.lin(x)


def test_train_one_epoch_and_evaluate():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = _Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    before = evaluate(model, "cpu", loader)
    assert set(model.seen) == {(False, False)}
    model.seen.clear()
    for epoch in range(5):
        out = train_one_epoch(model, "cpu", loader, opt, epoch)
    assert set(model.seen) == {(True, True)}
    assert set(out) >= {"loss", "accuracy", "images_per_s", "images", "seconds", "step_losses"}
    assert out["images"] == 64 and len(out["step_losses"]) == 4 and out["images_per_s"] > 0
    after = evaluate(model, "cpu", loader)
    assert set(after) >= {"loss", "accuracy"}
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.6
    assert train_one_epoch(model, "cpu", loader, opt, 9, max_steps=2)["images"] == 32


def test_train_progress_bar(capsys):
    pytest.importorskip("tqdm")
    model = _Probe()
    loader = [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))] * 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, "cpu", loader, opt, 1, progress=True, log_interval=1)
    err = capsys.readouterr().err
    assert "epoch 1" in err and "img_s" in err


def test_cli_smoke(tmp_path):
    """`python -m fastlayers train` on a small MNIST subset writes metrics, plot, checkpoint."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "fastlayers", "train", "--layers", "torch",
                        "--epochs", "1", "--limit", "256", "--batch-size", "32", "--out",
                        str(out), *FAST], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "epoch   1/1" in r.stdout and "final test accuracy" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "lenet5" and m["train_images"] == 256 and m["test_images"] == 256
    assert len(m["epochs"]) == 1 and len(m["epochs"][0]["step_losses"]) == 8
    assert 0 <= m["final_test_accuracy"] <= 1 and m["images_per_s"] > 0 and m["wall_time_s"] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = get_model("lenet5", layers="torch")
    model.load_state_dict(load_state_dict_file(out / "model.pt"))


@needs_fl
def test_cli_default_layers_are_fastlayers(tmp_path):
    assert train_main(["--dataset", "digits", "--limit", "64", "--epochs", "1", "--out",
                       str(tmp_path), *FAST]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["layers"] == "fastlayers"


@needs_fl
def test_compare_torch_first_losses_agree(tmp_path):
    """--compare-torch trains the torch.nn twin from the same weights and data order:
    the first steps' losses agree to float32 tolerance."""
    assert train_main(["--compare-torch", "--dataset", "digits", "--limit", "160", "--epochs",
                       "1", "--batch-size", "32", "--out", str(tmp_path), *FAST]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    fast = m["epochs"][0]["step_losses"][:3]
    ref = m["torch"]["epochs"][0]["step_losses"][:3]
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5)
    assert m["speedup"] > 0
    assert (tmp_path / "curves.png").exists()


def _digits_npz(path, classes):
    from sklearn.datasets import load_digits
    d = load_digits()
    keep = np.isin(d.target, classes)
    np.savez(path, x=(d.images[keep] / 16.0).astype(np.float32),
             y=d.target[keep] - min(classes))


def test_finetune_new_classes(tmp_path, capsys):
    """Train LeNet on digits 0-4, then fine-tune its head (features frozen) on 5-9."""
    pytest.importorskip("sklearn")
    _digits_npz(tmp_path / "d04.npz", [0, 1, 2, 3, 4])
    _digits_npz(tmp_path / "d59.npz", [5, 6, 7, 8, 9])
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_main(["--layers", "torch", "--dataset", f"npz:{tmp_path / 'd04.npz'}",
                       "--resize", "28", "--epochs", "3", "--batch-size", "32", "--out", str(a),
                       *FAST]) == 0
    assert json.loads((a / "metrics.json").read_text())["final_test_accuracy"] > 0.8
    layers = "fastlayers" if FL_OK else "torch"  # a torch checkpoint loads into either
    assert train_main(["--layers", layers, "--dataset", f"npz:{tmp_path / 'd59.npz'}",
                       "--resize", "28", "--finetune", str(a / "model.pt"), "--freeze",
                       "features", "--num-classes", "5", "--epochs", "2", "--batch-size", "32",
                       "--out", str(b), *FAST]) == 0
    out = capsys.readouterr().out
    assert "classifier.5 replaced (5 -> 5 classes)" in out and "froze 4 parameter" in out
    m = json.loads((b / "metrics.json").read_text())
    assert m["final_test_accuracy"] > 0.6  # chance is 0.2
    sa, sb = load_state_dict_file(a / "model.pt"), load_state_dict_file(b / "model.pt")
    for k in sa:
        if k.startswith("features."):
            assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa["classifier.1.weight"], sb["classifier.1.weight"])


def test_finetune_wrong_checkpoint(tmp_path):
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 4)}}, tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="classifier.5.weight"):
        train_main(["--layers", "torch", "--dataset", "digits", "--limit", "32", "--epochs", "1",
                    "--finetune", str(tmp_path / "x.pt"), *FAST])


# -- DDP ------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 28, 28, generator=g)
    y = torch.arange(8) % 10
    return TensorDataset(x, y), TensorDataset(x[:5], y[:5])


def _ddp_worker(rank, world, port, init_path, out_dir):
    from fastlayers.data import make_loaders
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = get_model("lenet5", layers="torch")
        model.load_state_dict(torch.load(init_path))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        train_set, test_set = _ddp_data()
        train, test = make_loaders(train_set, test_set, batch_size=4, seed=0, distributed=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        stats = train_one_epoch(ddp, "cpu", train, opt, epoch=0)
        ev = evaluate(ddp, "cpu", test)
        if rank == 0:
            torch.save({"state": model.state_dict(), "train": stats, "eval": ev},
                       os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_step_matches_single_process(tmp_path):
    """2 gloo processes x 4 images == 1 process x 8 images, after one SGD step."""
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    model = get_model("lenet5", layers="torch")  # no BatchNorm
    torch.save(model.state_dict(), tmp_path / "init.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "init.pt"), str(tmp_path)),
             nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt")
    train_set, test_set = _ddp_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = train_one_epoch(model, "cpu", DataLoader(train_set, batch_size=8), opt, epoch=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
    assert got["train"]["images"] == 8
    assert abs(got["train"]["loss"] - ref["loss"]) < 1e-5
    ev = evaluate(model, "cpu", DataLoader(test_set, batch_size=8))
    assert got["eval"]["images"] == 5
    assert abs(got["eval"]["loss"] - ev["loss"]) < 1e-5
    assert got["eval"]["accuracy"] == ev["accuracy"]


# -- summary and __main__ -------------------------------------------------------------------

def test_summary_cli(capsys):
    assert summary_main(["--model", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 61,706" in out
    assert "[1, 16, 5, 5]" in out and "[1, 10]" in out
    assert cli(["summary", "--model", "resnet18", "--input-size", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "11,173,962" in out and "layer4.1.conv2" in out and "[1, 512, 4, 4]" in out


def test_summarize_rows():
    model = get_model("resnet18", layers="fastlayers" if FL_OK else "torch", small_input=True)
    rows = summarize(model, (1, 16, 16), batch_size=2)
    by_name = {r["name"]: r for r in rows}
    assert by_name["fc"]["output_shape"] == [2, 10] and by_name["fc"]["params"] == 5130
    assert by_name["layer2.0.downsample.0"]["output_shape"] == [2, 128, 8, 8]
    assert by_name["(model)"]["total_params"] == sum(p.numel() for p in model.parameters())
    names = [r["name"] for r in rows]
    assert names.index("layer1") < names.index("layer1.0.conv1")  # parents first
    if FL_OK:
        assert by_name["conv1"]["type"] == "fastlayers.Conv2d"


def test_main_help_and_dispatch(capsys, monkeypatch):
    assert cli([]) == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli(["nope"])
    assert e.value.code == 2
    seen = []
    fake = types.ModuleType("fastlayers.bench")
    fake.main = lambda argv=None: seen.append(argv)
    monkeypatch.setitem(sys.modules, "fastlayers.bench", fake)
    assert cli(["bench", "--quick", "x"]) == 0
    assert seen == [["--quick", "x"]]
