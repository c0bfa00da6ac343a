# GPU image: official PyTorch CUDA runtime + this project; `pipeline` is the entrypoint.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ALIGN4GEN_HOME=/cache/align4gen \
    HF_HOME=/cache/huggingface

# PyAV and decord wheels are self-contained; ffmpeg CLI is handy for inspecting inputs.
RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/align4gen
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY cache_schema ./cache_schema
# keep the image's CUDA torch: install our other dependencies around it
RUN pip install -e . && pipeline --help > /dev/null

VOLUME ["/cache", "/data"]
WORKDIR /data
ENTRYPOINT ["pipeline"]
CMD ["--help"]
