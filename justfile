# scm_graph tasks. `just --list` shows them.

# Train a spec: just train specs/digits_sct.py [--field.sub value ...] [--resume]
train spec *args:
    python -m scm_graph.train {{spec}} {{args}}

# Write shards: just shard digits | just shard cifar10 --src cifar-10-python.tar.gz | just shard folder --src DIR --resolution R | just shard imagenet --src DIR --resolution 64 (or 512 --vae VAE_DIR)
shard *args:
    python -m scm_graph.shard {{args}}

# Sample a checkpoint: just sample --ckpt runs/digits_sct/ckpt.safetensors --steps 2 --n 64 --out grid.png
sample *args:
    python -m scm_graph.sample {{args}}

# FD of a digits checkpoint: just eval --ckpt runs/digits_sct/ckpt.safetensors --steps 1 2 --floor
eval *args:
    python -m scm_graph.eval {{args}}

# Benchmarks: just bench step [--spec specs/digits_dit.py --precision fp32 bf16 ...] [--all --max-params 2] | just bench attention [--n 1024 4096 ...] | just bench memory --spec S --ranks 1 8 | just bench encode [--vae DIR --batch 32] | just bench data [--spec S --workers 0 1 2] | just bench cold [--spec S --runs 3 --kind sct diffusion]
bench what *args:
    python -m scm_graph.bench {{what}} {{args}}

# A sweep: spec variants at one image budget over seeds, then sweep.md and plots: just sweep specs/sweeps/example.py [--only NAME ...] [--dry-run] [--report-only] [--out DIR]
sweep file *args:
    python -m scm_graph.sweep {{file}} {{args}}

# The test suite (what CI runs after installing)
test *args:
    python -m pytest -q {{args}}

# The tests against the real clean-fid library (an environment with clean-fid and torchvision: pip install -e ".[test,fid]")
test-cleanfid *args:
    python -m pytest -q -m cleanfid tests/eval/test_cleanfid.py {{args}}

# The README's default run: digits shards (once), sCT training, FD of 1- and 2-step samples
digits:
    [ -f shards/digits/manifest.json ] || python -m scm_graph.shard digits
    python -m scm_graph.train specs/digits_sct.py
    python -m scm_graph.eval --ckpt runs/digits_sct/ckpt.safetensors --steps 1 2 --floor

# Regenerate the golden-loss file (only for a numerics change made on purpose, in its own commit)
golden:
    python -m tests.train.test_golden_loss --write
