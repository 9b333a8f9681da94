# lit-align on the official PyTorch CUDA runtime image; the image's torch is kept as is.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

WORKDIR /opt/lit-align
COPY pyproject.toml README.md ./
COPY lit_align ./lit_align
COPY configs ./configs
# torch is already installed and satisfies "torch>=2.4", so pip leaves it alone.
RUN pip install --no-cache-dir ".[qlora]"

ENTRYPOINT ["lit-align"]
CMD ["fit", "--config", "configs/dpo.yaml"]
