"""Shared test helpers: a tiny MNIST in torchvision's raw IDX layout, running the script, and edited copies of it."""
import importlib.util
import os
import signal
import struct
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'parallel_gan.py')
# real MNIST for the tests that need it: the data_root in $GAP_MNIST (DIR with DIR/MNIST/raw), else ../shared/mnist
SHARED_MNIST = os.environ.get('GAP_MNIST') or os.path.join(ROOT, '..', 'shared', 'mnist')
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests'), os.path.join(ROOT, 'study')]


def write_idx(path, tensor):
    """A uint8 tensor as an IDX file (big-endian header: magic 0x08 type, dimension count, sizes)."""
    with open(path, 'wb') as f:
        f.write(struct.pack('>BBBB', 0, 0, 0x08, tensor.dim()))
        f.write(struct.pack(f'>{tensor.dim()}I', *tensor.shape))
        f.write(tensor.contiguous().numpy().tobytes())


def toy_digits(n, seed):
    """n 28x28 uint8 images of 10 easy classes (a bright square whose place is the class) and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 40, (n, 28, 28), generator=g)
    for i, label in enumerate(labels.tolist()):
        r, c = 2 + 8 * (label // 4), 2 + 8 * (label % 4)
        images[i, r:r + 8, c:c + 8] = 255
    return images.to(torch.uint8), labels.to(torch.uint8)


def make_mnist(root, train=300, test=100, kind='MNIST'):
    raw = os.path.join(root, kind, 'raw')
    os.makedirs(raw, exist_ok=True)
    for split, n, seed in (('train', train, 1), ('t10k', test, 2)):
        images, labels = toy_digits(n, seed)
        write_idx(os.path.join(raw, f'{split}-images-idx3-ubyte'), images)
        write_idx(os.path.join(raw, f'{split}-labels-idx1-ubyte'), labels)
    return str(root)


@pytest.fixture(scope='session')
def tiny_mnist(tmp_path_factory):
    """The data_root of a 300-image MNIST in torchvision's raw layout."""
    return make_mnist(tmp_path_factory.mktemp('tiny_mnist'))


def run_script(*args, timeout=120, env=None):
    """Run parallel_gan.py as a user would; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def load(path):
    return torch.load(path, weights_only=True)


def train(*args):
    """Run the script's training in this process (faster than a subprocess); returns its exit status."""
    import parallel_gan as pg
    return pg.train(pg.parse_args([str(a) for a in args]))


def stopped(capsys, *args):
    """(exit status, message) of a run that must stop: a refusal (status 2, message on stderr) or a stop
    with a message (status 1)."""
    with pytest.raises(SystemExit) as stop:
        train(*args)
    code = stop.value.code
    return (code, capsys.readouterr().err.strip()) if isinstance(code, int) else (1, code)


def edited_copy(folder, *edits):
    """parallel_gan.py copied into folder with (old, new) text replacements, each of which must apply, and
    imported as a module of its own: the script as a user who edited it would run it. Returns (module, path)."""
    with open(SCRIPT) as f:
        text = f.read()
    for old, new in edits:
        assert old in text, f'edit does not apply: {old!r}'
        text = text.replace(old, new)
    return script_module(text, folder, f'edited_parallel_gan_{abs(hash(text))}')


def script_module(text, folder, name):
    """text written to folder/parallel_gan.py and imported as a module called name. Returns (module, path)."""
    path = os.path.join(folder, 'parallel_gan.py')
    with open(path, 'w') as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def ctrl_c_at(monkeypatch, at):
    """Make parallel_gan.py send itself a Ctrl-C as its iteration `at` starts (monkeypatch.undo() ends it)."""
    import parallel_gan as pg
    step = pg.gap_iteration

    def interrupted(it, *args, **kwargs):
        if it == at:
            os.kill(os.getpid(), signal.SIGINT)
        return step(it, *args, **kwargs)
    monkeypatch.setattr(pg, 'gap_iteration', interrupted)
