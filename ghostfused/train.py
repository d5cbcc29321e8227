"""``python -m ghostfused train``: train GhostNetV2, fused or plain, on synthetic data or an image folder.

The pieces are reusable: :class:`TrainStep` (forward, loss, backward, optimizer step, under autocast) is also what
``python -m ghostfused bench`` times, and :func:`peak_memory_bytes` what it reports.

Checkpoints hold ``{"state_dict": ..., "epoch": ..., "args": ...}`` with the official key layout, so
``ghostfused.models.load_official(ghostfused.models.ghostnetv2(width, num_classes=...), path)`` loads them.
"""

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op context for ``None`` (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class TrainStep:
    """One training step of a classifier: zero the gradients, forward and cross-entropy loss under autocast,
    backward, optimizer step (through a GradScaler for float16).

    Call with images [N, 3, H, W] and integer targets [N]; returns the loss, a detached 0-d float32 tensor (reading
    it synchronises, so callers that time steps read it only when they must).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 amp_dtype: torch.dtype | None = None):
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def __call__(self, images: Tensor, targets: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            loss = F.cross_entropy(self.model(images), targets)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach().float()


# ----------------------------------------------------------------------------------------------------------------
# Peak memory


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_memory(device: torch.device) -> str:
    """Restart the peak-memory count of ``device``; returns how :func:`peak_memory_bytes` will measure.

    CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``). CPU: the process's peak resident set
    (``VmHWM``), reset through ``/proc/self/clear_refs`` where Linux allows it; elsewhere the process's lifetime
    peak (``ru_maxrss``), which cannot be reset.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak resident set size to the current one
        return "peak RSS (VmHWM, reset)"
    except OSError:
        return "peak RSS over the process lifetime (ru_maxrss)"


def current_memory_bytes(device: torch.device) -> int:
    """Memory in use now: allocated CUDA memory, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    rss = _proc_status_kib("VmRSS")
    return rss * 1024 if rss is not None else 0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since :func:`reset_peak_memory` (or process start), as that function describes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_status_kib("VmHWM")
    if peak is not None:
        return peak * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ----------------------------------------------------------------------------------------------------------------
# Data


class SyntheticImages:
    """Endless learnable synthetic batches, made on ``device``: each class has a fixed low-resolution colour
    template, upsampled and overlaid with Gaussian noise, so the loss can fall. Yields (images [N, 3, R, R] float32,
    targets [N] int64); the same ``seed`` gives the same batches."""

    def __init__(self, num_classes: int, resolution: int, batch_size: int, device: torch.device, seed: int = 0):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.templates = torch.randn(num_classes, 3, 4, 4, generator=self.generator, device=device)
        self.num_classes, self.resolution, self.batch_size, self.device = num_classes, resolution, batch_size, device

    def batch(self) -> tuple[Tensor, Tensor]:
        targets = torch.randint(self.num_classes, (self.batch_size,), generator=self.generator, device=self.device)
        images = F.interpolate(self.templates[targets], size=(self.resolution, self.resolution), mode="bilinear",
                               align_corners=False)
        return images + torch.randn(images.shape, generator=self.generator, device=self.device), targets

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.batch()


def _pil_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in class sub-folders (``root/<class>/<image>``, classes sorted by name), read with PIL.

    The fallback for ``torchvision.datasets.ImageFolder`` where torchvision does not import. Training transform:
    shorter side resized to a random size in [R, 1.15 R], random R x R crop, random horizontal flip, ImageNet
    normalisation. Items: (image [3, R, R] float32, class index).
    """

    def __init__(self, root: str | os.PathLike, resolution: int):
        root = Path(root)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [(path, index) for index, name in enumerate(self.classes)
                        for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        import numpy as np
        from PIL import Image

        path, target = self.samples[index]
        image = _pil_rgb(path)
        r = self.resolution
        short = int(torch.randint(r, int(r * 1.15) + 1, ()).item())
        scale = short / min(image.size)
        size = (max(r, round(image.size[0] * scale)), max(r, round(image.size[1] * scale)))
        image = image.resize(size, Image.BILINEAR)
        left = int(torch.randint(size[0] - r + 1, ()).item())
        top = int(torch.randint(size[1] - r + 1, ()).item())
        image = image.crop((left, top, left + r, top + r))
        if torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (pixels - mean) / std, target


def image_folder(root: str | os.PathLike, resolution: int) -> tuple[torch.utils.data.Dataset, int, str]:
    """The dataset of ``root`` (class sub-folders), its class count, and which loader reads it."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--data {root}: not a folder (expected class sub-folders of images)")
    try:
        from torchvision import datasets, transforms
    except Exception:  # torchvision missing, or unable to load its compiled ops with this torch (ENV.md)
        dataset = ImageFolderDataset(root, resolution)
        loader = "ghostfused PIL loader"
    else:
        dataset = datasets.ImageFolder(root, transform=transforms.Compose([
            transforms.RandomResizedCrop(resolution), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
        loader = "torchvision ImageFolder"
    if len(dataset) == 0 or len(dataset.classes) == 0:
        raise ValueError(f"--data {root}: no images found in class sub-folders")
    return dataset, len(dataset.classes), loader


# ----------------------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None,
                        help="image folder with one sub-folder per class (default: synthetic data)")
    parser.add_argument("--backend", default="auto", choices=("auto", "eager", "triton", "cpu", "cuda"),
                        help="fused backend; 'eager' trains the plain PyTorch model (default: %(default)s)")
    parser.add_argument("--width", type=float, default=1.0, help="channel width (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per epoch (default: 20 on synthetic data, one pass over an image folder)")
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.9, help="default: %(default)s")
    parser.add_argument("--weight-decay", type=float, default=4e-5, help="default: %(default)s")
    parser.add_argument("--resolution", type=int, default=224, help="image size (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=10,
                        help="classes of the synthetic data (an image folder gives its own; default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--amp", default="fp32", choices=tuple(AMP_DTYPES),
                        help="autocast dtype (bf16 on CPU and GPU, fp16 on GPU; default: %(default)s)")
    parser.add_argument("--channels-last", action="store_true", help="images and model in channels_last")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data-loading processes for --data (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--output", default="ghostnetv2.pth",
                        help="checkpoint path, written after every epoch (default: %(default)s)")


def _batches(args, device: torch.device, num_classes: int, dataset) -> tuple[Iterator, int]:
    """An iterator over every training batch of the run, and the number of steps per epoch."""
    if dataset is None:
        steps = args.steps or 20
        data = iter(SyntheticImages(num_classes, args.resolution, args.batch_size, device, args.seed))
        return (next(data) for _ in range(args.epochs * steps)), steps
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    if len(loader) == 0:
        raise ValueError(f"--data {args.data}: fewer images ({len(dataset)}) than one batch ({args.batch_size})")
    steps = min(args.steps or len(loader), len(loader))

    def epochs():
        for _ in range(args.epochs):
            for step, (images, targets) in enumerate(loader):
                if step == steps:
                    break
                yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    return epochs(), steps


def train(args: argparse.Namespace) -> dict:
    """Train as ``args`` (from :func:`add_arguments`) say; returns a summary (losses, images/s, peak memory)."""
    from . import backends
    from .models import ghostnetv2

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = AMP_DTYPES[args.amp]
    torch.manual_seed(args.seed)
    dataset, loader_name = None, "synthetic"
    num_classes = args.num_classes
    if args.data is not None:
        dataset, num_classes, loader_name = image_folder(args.data, args.resolution)
    backend = None if args.backend == "eager" else args.backend
    model = ghostnetv2(args.width, num_classes=num_classes, backend=backend).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    step_fn = TrainStep(model, optimizer, device, amp_dtype)
    batches, steps_per_epoch = _batches(args, device, num_classes, dataset)
    fused = "plain PyTorch" if backend is None else f"fused, backend {backends.resolve(backend, device)}"
    print(f"ghostnetv2 width {args.width} ({fused}), {num_classes} classes, {loader_name} data, device {device}, "
          f"batch {args.batch_size}, {args.resolution}x{args.resolution}, {args.amp}"
          f"{', channels_last' if args.channels_last else ''}; {args.epochs} epoch(s) of {steps_per_epoch} steps",
          flush=True)

    total = args.epochs * steps_per_epoch
    progress = tqdm(total=total, unit="step", dynamic_ncols=True, disable=None) if tqdm is not None else None
    reset_peak_memory(device)
    losses, images_seen, timed_seconds = [], 0, 0.0
    warmup_steps = min(2, total - 1)  # the first steps pay one-time costs (allocations, kernel selection)
    start = time.perf_counter()
    for step, (images, targets) in enumerate(batches):
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = step_fn(images, targets)
        losses.append(loss.item())
        now = time.perf_counter()
        if step >= warmup_steps:
            images_seen += images.shape[0]
            timed_seconds += now - start
        start = now
        if progress is not None:
            progress.update()
            progress.set_postfix(loss=f"{losses[-1]:.4f}",
                                 img_s=f"{images_seen / timed_seconds:.1f}" if timed_seconds else "-")
        if (step + 1) % steps_per_epoch == 0:
            epoch = (step + 1) // steps_per_epoch
            torch.save({"state_dict": model.state_dict(), "epoch": epoch, "args": vars(args)}, args.output)
            message = (f"epoch {epoch}/{args.epochs}: loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.4f}, "
                       f"checkpoint {args.output}")
            (progress.write if progress is not None else print)(message)
    if progress is not None:
        progress.close()
    summary = {
        "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
        "images_per_second": images_seen / timed_seconds if timed_seconds else None,
        "peak_memory_bytes": peak_memory_bytes(device), "output": args.output,
    }
    rate = f"{summary['images_per_second']:.1f}" if summary["images_per_second"] else "-"
    print(f"{len(losses)} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}, {rate} images/s "
          f"(after {warmup_steps} warm-up steps), peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB "
          f"({'CUDA allocator' if device.type == 'cuda' else 'process peak RSS'}); checkpoint {args.output}")
    return summary
