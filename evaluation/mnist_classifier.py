"""A small CNN MNIST classifier: the feature network of MNIST-FID and the judge of class accuracy.

Input convention: float ``[N, 1, 32, 32]`` in [-1, 1], background -1 (``evaluation.mnist.to_unit_range``).
``features`` is the 128-d penultimate layer (post-ReLU), ``forward`` the 10 class logits.
The shipped weights are ``frontends/embedded/mnist_classifier.pt`` (fp16 state dict) and the
reference statistics of the 1,000 held-out digits ``frontends/embedded/mnist_fid_ref.npz``;
``frontends/embedded/CLASSIFIER.md`` says how both were made.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from evaluation.images import nhwc_uint8

EMBEDDED = Path(__file__).resolve().parent.parent / "frontends" / "embedded"  # beside the shipped models it scores
CHECKPOINT = EMBEDDED / "mnist_classifier.pt"
FID_REF = EMBEDDED / "mnist_fid_ref.npz"
FEATURE_DIM = 128
SIZE = 32


class MnistClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)   # 16x16
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)   # 8x8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)   # 4x4
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def images_to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images ``[N, H, W]``, ``[N, H, W, 1]`` or ``[N, H, W, 3]`` (what ``tools.generate``
    writes) -> float ``[N, 1, 32, 32]`` in [-1, 1].

    Colour is averaged to grey. 28x28 digits are zero-padded to 32 like the training data;
    any other size is resized (bilinear with antialiasing).
    """
    x = nhwc_uint8(images)
    x = x.float().mean(-1, keepdim=True).permute(0, 3, 1, 2).div(127.5).sub(1.0)
    h, w = x.shape[-2:]
    if (h, w) == (28, 28):
        return F.pad(x, (2, 2, 2, 2), value=-1.0)
    if (h, w) != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


def load_classifier(path: str | Path | None = None) -> MnistClassifier:
    """The shipped classifier (or a state dict at ``path``), float32, in eval mode."""
    path = Path(path) if path is not None else CHECKPOINT
    if not path.is_file():
        raise UserError(f"MNIST classifier weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MnistClassifier()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


@torch.no_grad()
def predict(model: MnistClassifier, x: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, 128], class probabilities [N, 10])`` of inputs in the model's convention."""
    feats, probs = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i:i + batch])
        feats.append(f)
        probs.append(model.head(f).softmax(-1))
    return torch.cat(feats), torch.cat(probs)


def _shift(x: torch.Tensor, g: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Random translations of up to ``max_px`` pixels (background fill): generated digits are not centred."""
    n = len(x)
    padded = F.pad(x, (max_px,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_px + 1, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(SIZE))[:, :, None]
    cols = (dx[:, None] + torch.arange(SIZE))[:, None, :]
    return padded[:, 0][torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, epochs: int = 8,
                     batch: int = 64, lr: float = 2e-3, progress=None) -> MnistClassifier:
    """Train on ``images`` (float ``[N, 1, 32, 32]`` in [-1, 1]) with Adam and a cosine schedule, seeded.

    ``progress`` wraps the epoch iterable (e.g. ``core.progress.progress``). Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MnistClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(images) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    epoch_iter = range(epochs) if progress is None else progress(range(epochs), desc="classifier", unit="epoch")
    model.train()
    for _ in epoch_iter:
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(_shift(images[idx], g)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: MnistClassifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, x)[1].argmax(-1) == labels).float().mean())


def build_embedded(out_dir: str | Path = EMBEDDED, *, seed: int = 0, epochs: int = 8, progress=None,
                   data_root: str | Path | None = None) -> dict:
    """Train on the 9,000 training digits, write the fp16 checkpoint and the held-out FID reference.

    The reference statistics come from the fp16 weights as loaded (``load_classifier``), so the
    shipped files agree with each other. Returns ``{"heldout_accuracy", "count"}``.
    """
    from evaluation.metrics import gaussian_stats
    from evaluation.mnist import load_mnist, to_unit_range, train_holdout_split

    images, labels = load_mnist(data_root)
    train, held = train_holdout_split(len(images))
    model = train_classifier(to_unit_range(images[train]), labels[train], seed=seed, epochs=epochs,
                             progress=progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / CHECKPOINT.name
    tmp = ckpt.with_suffix(".tmp")
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(ckpt)
    model = load_classifier(ckpt)
    x_held = to_unit_range(images[held])
    feats, probs = predict(model, x_held)
    mu, sigma = gaussian_stats(feats.double().numpy())
    tmp = out_dir / "mnist_fid_ref.tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, count=np.int64(len(held)))
    tmp.replace(out_dir / FID_REF.name)
    return {"heldout_accuracy": float((probs.argmax(-1) == labels[held]).float().mean()), "count": len(held)}


def load_fid_ref(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, count)`` of the held-out digits' features."""
    path = Path(path) if path is not None else FID_REF
    if not path.is_file():
        raise UserError(f"MNIST-FID reference statistics not found: {path}")
    with np.load(path) as d:
        return d["mu"], d["sigma"], int(d["count"])


if __name__ == "__main__":  # thin: the work is build_embedded
    from core.progress import progress as _progress

    print(build_embedded(progress=_progress))
