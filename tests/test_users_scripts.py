"""Unmodified user scripts through `python -m tpp_plugin run --neuron tpp`.

1. A script written here in the style of SpikingJelly's ann2snn examples (single-step loop over T
   steps with ``out += net(x)``, accuracy after every step, ``reset_net`` between batches) with
   ``RateCodingRecipe`` and ``LocalThresholdBalancingRecipe`` (or 0.0.0.0.14's ``Converter``).
2. SpikingJelly 2.0.0's own ``ann2snn/examples/cnn_mnist.py`` from the installed wheel, on a
   Fashion-MNIST subset written in torchvision's MNIST layout, with a checkpoint of its
   ``sample_models.mnist_cnn.CNN`` trained here.

Both must give exactly what multi-step TPP gives on the same conversions (same seeds).
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from spikingjelly.activation_based import ann2snn, functional

import tpp_plugin
from tpp_plugin.adapters.spikingjelly import IS_LEGACY
from tpp_plugin.experiments.data import FASHION_MNIST_DIR, read_idx

T = 8
NEURON_KWARGS = {"T": T, "seed": 0}  # bernoulli: the same seeds must give the same draws

EXAMPLE_STYLE_SCRIPT = textwrap.dedent(
    """
    import argparse, json
    import torch
    from torch import nn
    from spikingjelly.activation_based import ann2snn, functional

    parser = argparse.ArgumentParser()
    parser.add_argument("--time-steps", type=int, default=8)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    images = torch.rand(96, 1, 16, 16)
    labels = ann(images).argmax(1)
    calibration = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]
    test = [(images[i:i + 24], labels[i:i + 24]) for i in range(0, 96, 24)]

    def val(net, T):
        corrects, total, outputs = [0] * T, 0, []
        with torch.no_grad():
            for img, label in test:
                functional.reset_net(net)
                out = 0.
                for t in range(T):
                    out = out + net(img)
                    corrects[t] += (out.argmax(1) == label).sum().item()
                outputs.append(out.tolist())
                total += len(label)
        return [c / total for c in corrects], outputs

    results = {}
    if hasattr(ann2snn, "RateCodingRecipe"):
        recipes = {"rate": ann2snn.RateCodingRecipe(calibration, mode="99.9%"),
                   "ltb": ann2snn.LocalThresholdBalancingRecipe(calibration)}
        for name, recipe in recipes.items():
            snn = ann2snn.Converter(recipe).convert(ann)
            results[name] = val(snn, args.time_steps)
    else:
        snn = ann2snn.Converter(calibration, mode="99.9%")(ann)
        results["rate"] = val(snn, args.time_steps)
    results["neurons"] = sorted({type(m).__name__ for m in snn.modules()
                                 if "Node" in type(m).__name__})
    with open(args.output, "w") as f:
        json.dump(results, f)
    """
)


def run_plugin(args, cwd, timeout=600):
    inherited = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if p]  # the script runs in tmp_path: a relative entry would point elsewhere
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [*inherited, os.path.dirname(os.path.dirname(tpp_plugin.__file__))])}
    done = subprocess.run([sys.executable, "-m", "tpp_plugin", "run", "--neuron", "tpp",
                           "--neuron-kwargs", *(f"{k}={v}" for k, v in NEURON_KWARGS.items()),
                           *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@torch.no_grad()
def multi_step_outputs(snn, batches, T):
    """What the example's loop computes, in multi-step mode: Σ_t out_t per batch."""
    functional.set_step_mode(snn, "m")
    outs = []
    for img, _ in batches:
        functional.reset_net(snn)
        outs.append(snn(img.unsqueeze(0).expand(T, *img.shape)).sum(0))
    return outs


def test_example_style_script_single_step_loop_equals_multi_step(tmp_path):
    script = tmp_path / "ann2snn_example.py"
    script.write_text(EXAMPLE_STYLE_SCRIPT)
    run_plugin([str(script), "--time-steps", str(T), "--output", str(tmp_path / "out.json")],
               tmp_path)
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["neurons"] == ["TPPNode"]

    # the same conversions, multi-step, in this process
    namespace = {}
    setup = EXAMPLE_STYLE_SCRIPT.split("def val")[0].replace("args = parser.parse_args()", "")
    exec(compile(setup, "setup", "exec"), namespace)  # the script's own model and data
    ann, calibration, test = namespace["ann"], namespace["calibration"], namespace["test"]
    if IS_LEGACY:
        conversions = {"rate": lambda: ann2snn.Converter(
            calibration, mode="99.9%", neuron="tpp", neuron_kwargs=NEURON_KWARGS)(
                copy.deepcopy(ann))}
    else:
        recipes = {"rate": lambda: ann2snn.RateCodingRecipe(
                       calibration, mode="99.9%", neuron="tpp", neuron_kwargs=NEURON_KWARGS),
                   "ltb": lambda: ann2snn.LocalThresholdBalancingRecipe(
                       calibration, neuron="tpp", neuron_kwargs=NEURON_KWARGS)}
        conversions = {name: (lambda r=r: ann2snn.Converter(r()).convert(ann))
                       for name, r in recipes.items()}
    for name, convert in conversions.items():
        accuracies, outputs = results[name]
        expected = multi_step_outputs(convert(), test, T)
        for got, want in zip(outputs, expected):
            assert torch.allclose(torch.tensor(got), want.float(), atol=1e-5), name
        labels = torch.cat([label for _, label in test])
        final = (torch.cat(expected).argmax(1) == labels).float().mean().item()
        assert accuracies[-1] == pytest.approx(final)


# ---------------------------------------------------------------- SpikingJelly's own example
def write_mnist_layout(root, n_train, n_test):
    """A Fashion-MNIST subset as torchvision's MNIST folder (raw, uncompressed idx files)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, dims in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
            data = read_idx(os.path.join(FASHION_MNIST_DIR, f"{split}-{kind}.gz"))[:n]
            header = np.array([0x08 << 8 | dims, *data.shape], dtype=">i4").tobytes()
            (raw / f"{split}-{kind}").write_bytes(header + data.astype(np.uint8).tobytes())


def trained_cnn_mnist(root, n_train: int = 1200, n_test: int = 300):
    """SpikingJelly's cnn_mnist.py setup in ``root``: a Fashion-MNIST subset in torchvision's
    MNIST layout and a checkpoint of its ``sample_models.mnist_cnn.CNN`` trained 3 epochs here.

    :return: ``(model, checkpoint path, train set, test set)``
    """
    import torchvision
    from spikingjelly.activation_based.ann2snn.sample_models import mnist_cnn

    torch.manual_seed(0)
    write_mnist_layout(root, n_train=n_train, n_test=n_test)
    to_tensor = torchvision.transforms.ToTensor()
    train = torchvision.datasets.MNIST(str(root), train=True, transform=to_tensor)
    test = torchvision.datasets.MNIST(str(root), train=False, transform=to_tensor)
    model = mnist_cnn.CNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(3):
        for img, label in torch.utils.data.DataLoader(train, batch_size=50, shuffle=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(img), label).backward()
            optimizer.step()
    checkpoint = root / "cnn.pth"
    torch.save(model.state_dict(), checkpoint)
    return model, checkpoint, train, test


@pytest.mark.skipif(IS_LEGACY, reason="cnn_mnist.py ships with SpikingJelly 2.x")
@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_spikingjelly_cnn_mnist_example_runs_unmodified(tmp_path):
    from spikingjelly.activation_based.ann2snn.examples import cnn_mnist

    model, checkpoint, train, test = trained_cnn_mnist(tmp_path)

    run_plugin([cnn_mnist.__file__, "--dataset-dir", str(tmp_path), "--time-steps", str(T),
                "--device", "cpu", "--checkpoint-path", str(checkpoint),
                "--output", str(tmp_path / "results.json")], tmp_path)
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]

    calibration = torch.utils.data.DataLoader(train, batch_size=100, shuffle=False)
    batches = list(torch.utils.data.DataLoader(test, batch_size=50, shuffle=False))
    labels = torch.cat([label for _, label in batches])
    recipes = {f"robust_scalar_t{T}": lambda: ann2snn.RateCodingRecipe(
                   calibration, mode="99.9%", neuron="tpp", neuron_kwargs=NEURON_KWARGS),
               f"ltb_t{T}": lambda: ann2snn.LocalThresholdBalancingRecipe(
                   calibration, neuron="tpp", neuron_kwargs=NEURON_KWARGS)}
    model.eval()
    for key, recipe in recipes.items():
        snn = ann2snn.Converter(recipe()).convert(copy.deepcopy(model))
        out = torch.cat(multi_step_outputs(snn, batches, T))
        expected = (out.argmax(1) == labels).float().mean().item() * 100
        assert metrics[key]["top1"] == pytest.approx(expected), key
        assert metrics[key]["top1"] > 40  # far above chance (10 %): the loop sees the spikes
