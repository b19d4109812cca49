"""Worker threads share one model per process (CDS_WORKERS=n): what they do at once must be safe.

Grad-CAM's backward pass writes the shared network's parameter gradients; two threads doing it
at once aborted the worker ("free(): corrupted unsorted chunks") in a 2-thread load run. The
check runs in a child process, because the failure it guards against kills the process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cds_service.core.domain import Task
from support import make_test_weights

pytestmark = pytest.mark.slow  # models scored from several threads, memory measured

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import sys, threading
    import numpy as np, torch
    from pathlib import Path
    from cds_service.core.domain import Task
    from cds_service.core.explain import explain
    from cds_service.core.inference import score_images
    from cds_service.core.models import load_model

    torch.set_num_threads(1)
    model = load_model(Path(sys.argv[1]), Task.HEAD_CT_ICH, runtime="auto", threads=1)
    rng = np.random.default_rng(0)
    images = [np.broadcast_to(rng.random((96, 96, 1), dtype=np.float32), (96, 96, 3)) for _ in range(6)]
    errors = []

    def work():
        try:
            for _ in range(int(sys.argv[2])):
                scores = score_images(model, images, batch_size=4)
                explain(model, images[scores.driving_slice(0)], "any")
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
    print("errors:", errors)
    sys.exit(1 if errors else 0)
''')


def test_two_threads_score_and_explain_with_one_model(tmp_path: Path) -> None:
    make_test_weights(tmp_path, Task.HEAD_CT_ICH, input_size=64)
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), "100"], cwd=REPO, capture_output=True,
                           text=True, timeout=280)
    assert child.returncode == 0, (child.returncode, child.stdout[-2000:], child.stderr[-2000:])


TRIM_CHILD = textwrap.dedent('''
    from cds_service.worker import release_free_memory

    def rss_mb():
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) // 1024

    blocks, keepers = [], []
    for _ in range(3000):  # 190 MB from malloc, each block pinned in place by a small one after it
        blocks.append(bytearray(64 * 1024))
        keepers.append(bytearray(1024))
    del blocks
    held = rss_mb()
    release_free_memory()
    print(held, rss_mb())
''')


def test_a_worker_hands_freed_memory_back_after_a_job() -> None:
    """What a job freed stays resident in glibc's heap until trimmed; the worker trims after each job."""
    from cds_service.worker import _malloc_trim

    if _malloc_trim() is None:
        import pytest

        pytest.skip("no malloc_trim in this C library (not glibc)")
    child = subprocess.run([sys.executable, "-c", TRIM_CHILD], cwd=REPO, capture_output=True, text=True, timeout=60)
    held, trimmed = map(int, child.stdout.split())
    assert held - trimmed > 120, (held, trimmed)
