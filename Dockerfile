# hermes-discord in a container: the bot, its personas, and `hermes-bot` as the entry point.
#
#   docker build -t hermes-discord .                        # NVIDIA GPU (CUDA runtime base)
#   docker build -t hermes-discord --build-arg TORCH=cpu .  # CPU only: the 180 MB CPU torch build
#   docker run --gpus all --env-file .env -v hermes-data:/app/data hermes-discord
#
# The token comes in at run time (--env-file .env, or compose's env_file); .dockerignore keeps
# .env out of the image. Memory, settings and the Hugging Face cache live in the /app/data volume.
ARG BASE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
FROM ${BASE}

# cuda: the default torch wheels; cpu: torch from the CPU index. Both get the `quant` extra
# (bitsandbytes: QUANTIZATION=4bit|8bit on the GPU or the CPU).
ARG TORCH=cuda

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DB_PATH=/app/data/hermes.db \
    HF_HOME=/app/data/hf

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app

# hadolint ignore=DL3013
RUN if [ "$TORCH" = "cpu" ]; then \
        pip install torch --index-url https://download.pytorch.org/whl/cpu; \
    fi

COPY pyproject.toml README.md LICENSE ./
COPY bot ./bot
COPY cogs ./cogs
COPY training ./training
COPY personas ./personas

# hadolint ignore=DL3013
RUN pip install ".[quant]"

RUN useradd --create-home --uid 10001 --user-group hermes \
    && mkdir -p /app/data \
    && chown hermes:hermes /app/data

USER 10001:10001
VOLUME ["/app/data"]

ENTRYPOINT ["hermes-bot"]
CMD ["run"]
