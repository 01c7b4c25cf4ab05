"""snnTorch + tpp_plugin: convert a small digits CNN, then compare IF and TPP neurons.

The snnTorch tutorial pattern, unchanged: ``utils.reset(net)``, a time loop of ``num_steps``
steps feeding the image as a constant input current at every step,
``snntorch.functional.accuracy_rate`` on the recorded output. The plugin adds ``snn.TPP`` and the
converter; its time-loop networks are window-synchronous, so step ``t`` of the loop is step ``t``
of sequence mode (for input that changes within a window: ``streaming='delayed'`` and
``steps_needed``).

Run (CPU, well under a minute)::

    python examples/snntorch_digits.py
"""

from __future__ import annotations

import time

import snntorch.functional as SF
import torch
from snntorch import utils

import tpp_plugin  # noqa: F401  (registers snn.TPP; utils.reset now resets it too)
from tpp_plugin.adapters.snntorch import convert
from tpp_plugin.experiments.data import load_digits, loaders
from tpp_plugin.experiments.models import ann_accuracy, digits_cnn, train_ann


@torch.no_grad()
def snn_accuracy(net, x, y, num_steps: int) -> float:
    """snnTorch's tutorial loop over a converted (time-loop) network."""
    utils.reset(net)  # clears Leaky *and* TPP state
    out_rec = []
    for _step in range(num_steps):
        out_rec.append(net(x))  # direct current input: the image at every step
    out = torch.stack(out_rec)  # [num_steps, batch, 10]
    return SF.accuracy_rate(out, y)


def main():
    start = time.time()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and robust on a busy machine
    x_train, y_train, x_test, y_test = load_digits()
    train_loader, test_loader = loaders(x_train, y_train, x_test, y_test)
    torch.manual_seed(0)
    ann = train_ann(digits_cnn(), train_loader, epochs=30)  # a 5-spiking-layer ReLU CNN
    ann_acc = ann_accuracy(ann, test_loader)
    print(f"ANN (ReLU) test accuracy: {ann_acc:.2%}   [{len(y_test)} test images]")

    calibration = [(x_train[i:i + 256], None) for i in range(0, len(y_train), 256)]
    neurons = {
        "IF (θ/2 start)": dict(neuron="if"),
        "TPP bernoulli": dict(neuron="tpp", count="bernoulli", seed=0),
        "TPP exact": dict(neuron="tpp", count="exact", seed=0),
    }
    steps = (1, 2, 4, 8)
    print(f"\n{'neuron':<16}" + "".join(f"   T={t:<3}" for t in steps))
    for label, kwargs in neurons.items():
        accs = []
        for num_steps in steps:
            net = convert(ann, calibration, num_steps=num_steps, mode="99.9%", sequence=False,
                          **kwargs)
            accs.append(snn_accuracy(net, x_test, y_test, num_steps))
        print(f"{label:<16}" + "".join(f"  {a:6.2%}" for a in accs))

    # the same TPP network in sequence mode: one call on [T, B, ...], the same spikes
    num_steps = 4
    loop = convert(ann, calibration, num_steps=num_steps, mode="99.9%", sequence=False, seed=0)
    seq = convert(ann, calibration, num_steps=num_steps, mode="99.9%", sequence=True, seed=0)
    with torch.no_grad():
        out_seq = seq(x_test.expand(num_steps, *x_test.shape))
    print(f"\nTPP T={num_steps}: time loop {snn_accuracy(loop, x_test, y_test, num_steps):.2%}, "
          f"sequence mode {SF.accuracy_rate(out_seq, y_test):.2%}")
    print(f"(digits is easy to separate; see docs/results.md for Fashion-MNIST numbers)  "
          f"[{time.time() - start:.1f} s]")


if __name__ == "__main__":
    main()
