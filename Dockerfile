# coilguard for the CPU services: AssessCoils, scheduler, API, migrations, simulator.
#   docker build -t coilguard:latest .
# PyTorch comes from its CPU wheel index (no CUDA libraries: about 2 GB less); retraining on a GPU
# uses Dockerfile.cuda. Nothing is downloaded when a container runs.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/coilguard
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ml ml
COPY workflows workflows
COPY services services
COPY migrations migrations
RUN /opt/coilguard/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" .

FROM ${PYTHON_IMAGE}
# libgomp: PyTorch's OpenMP runtime; libgl/libglib: OpenCV, which ultralytics imports
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/coilguard --create-home coilguard
COPY --from=build /opt/coilguard /opt/coilguard
# the commit that the manifests of models trained here name (the image has no .git); late, so that a new
# commit rebuilds no layer above: --build-arg COILGUARD_COMMIT=$(git describe --always --dirty --abbrev=12)
ARG COILGUARD_COMMIT=
# HOME in /tmp: what libraries cache under ~ (torch, CUDA's ~/.nv) must not land in the shared store mounted at
# /var/lib/coilguard (read-only in most pods; the models' and reports' volume in all)
ENV PATH=/opt/coilguard/bin:$PATH \
    COILGUARD_COMMIT=${COILGUARD_COMMIT} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DO_NOT_TRACK=1 \
    YOLO_OFFLINE=True \
    MPLBACKEND=Agg \
    HOME=/tmp/coilguard \
    MPLCONFIGDIR=/tmp/matplotlib \
    YOLO_CONFIG_DIR=/tmp/ultralytics \
    COILGUARD_MODEL_DIR=/var/lib/coilguard/models \
    COILGUARD_REPORT_DIR=/var/lib/coilguard/reports \
    COILGUARD_LOG_FORMAT=json
USER coilguard
WORKDIR /var/lib/coilguard
EXPOSE 8080 9100
ENTRYPOINT ["coilguard"]
CMD ["--help"]
