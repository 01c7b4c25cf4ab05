"""Registration into frameworks: idempotent, reversible, polite, optional."""

import subprocess
import sys
import textwrap
import warnings

import pytest

import tpp_plugin
from tpp_plugin.registry import Patcher

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
from spikingjelly.activation_based import ann2snn, layer  # noqa: E402

from tpp_plugin.adapters.spikingjelly import IS_LEGACY  # noqa: E402

HOOKED = ann2snn.Converter if IS_LEGACY else ann2snn.RateCodingRecipe


@pytest.fixture
def restore_registration():
    yield
    tpp_plugin.register()


def test_import_registers_and_register_is_idempotent():
    assert "spikingjelly" in tpp_plugin.registered()
    init = HOOKED.__init__
    tpp_plugin.register()
    tpp_plugin.register("spikingjelly")
    assert HOOKED.__init__ is init
    assert sj_neuron.TPPNode is tpp_plugin.adapters.spikingjelly.TPPNode


def test_unregister_restores_everything(restore_registration):
    hooked_init = HOOKED.__init__
    tpp_plugin.unregister()
    assert "spikingjelly" not in tpp_plugin.registered()
    assert not hasattr(sj_neuron, "TPPNode")
    assert not hasattr(layer, "TemporalPermutation")
    assert HOOKED.__init__ is not hooked_init
    assert not getattr(HOOKED.__init__, "__tpp_plugin_wrapper__", False)
    with pytest.raises(TypeError):
        HOOKED([], neuron="tpp")
    tpp_plugin.register()
    assert getattr(HOOKED.__init__, "__tpp_plugin_wrapper__", False)


def test_patcher_never_overwrites_a_foreign_name():
    class Owner:
        existing = "theirs"

    patcher = Patcher("test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not patcher.add(Owner, "existing", "ours")
    assert Owner.existing == "theirs"
    assert any("already exists" in str(w.message) for w in caught)
    assert patcher.add(Owner, "new", "ours") and Owner.new == "ours"
    patcher.undo()
    assert not hasattr(Owner, "new") and Owner.existing == "theirs"


def test_patcher_wrap_is_idempotent_and_undoable():
    class Owner:
        def f(self):
            return 1

    original = Owner.__dict__["f"]
    patcher = Patcher("test")

    def make(orig):
        def f(self):
            return orig(self) + 1

        return f

    first = patcher.wrap(Owner, "f", make)
    assert patcher.wrap(Owner, "f", make) is first
    assert Owner().f() == 2
    patcher.undo()
    assert Owner.__dict__["f"] is original and Owner().f() == 1


def test_top_level_reset_reaches_plugin_modules():
    import torch

    from tpp_plugin.adapters.spikingjelly import TPPNode

    node = TPPNode(T=4)
    node(torch.rand(3))
    tpp_plugin.reset(torch.nn.Sequential(node))
    assert node.t == 0 and node.v == 0.0


def test_unknown_framework_is_an_error():
    with pytest.raises(ValueError, match="unknown framework"):
        tpp_plugin.register("brian2")


def test_import_without_any_framework():
    code = textwrap.dedent(
        """
        import sys
        sys.modules['spikingjelly'] = None
        sys.modules['snntorch'] = None
        import tpp_plugin, torch
        assert tpp_plugin.registered() == (), tpp_plugin.registered()
        s = tpp_plugin.functional.tpp_forward(torch.full((4, 3), 0.5), count='exact')
        assert s.sum(0).tolist() == [2.0, 2.0, 2.0]
        print('ok')
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
