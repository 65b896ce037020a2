# The image a fine-tune on a Kubernetes cluster runs in:
#   modeldeck finetune BASE DATA --target CONTEXT/NAMESPACE --image REGISTRY/modeldeck-finetune:TAG
#
# What any such image must contain (this file is one way to get it):
# - `python` on PATH, Python 3.11 or newer;
# - modeldeck installed with its [training] extra (torch, transformers, peft, safetensors, accelerate), at
#   the version of the modeldeck that starts the run: the Job runs `python -m engine.jobs.finetune --spec`;
# - a CUDA build of torch for runs with GPUs, and bitsandbytes for QLoRA.
# The pod downloads the base model from the Hugging Face Hub (HF_TOKEN comes from a Secret when you have
# one), so the cluster must reach the Hub or a mirror named by HF_ENDPOINT.
#
# Build it from the root of a modeldeck checkout and push it where the cluster pulls from:
#   docker build -f deploy/finetune.Dockerfile -t registry.example.com/modeldeck-finetune:0.1.0 .
#   docker push registry.example.com/modeldeck-finetune:0.1.0
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /opt/modeldeck
COPY pyproject.toml README.md ./
COPY catalog catalog
COPY engine engine
COPY tui tui
RUN pip install --no-cache-dir '.[training]' bitsandbytes
# No entry point: the Job names its own command.
