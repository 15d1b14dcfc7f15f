# The GPU image: vLLM's official image with this package (the capture plugin and `atu`) installed beside it.
# One image serves both containers of deploy/compose.yaml: vLLM (with the capture plugin) and the guard.
#   docker build -t align-then-unlearn:gpu .
# The base tag must stay on the vLLM minor that the `gpu` extra pins (pyproject.toml): the capture plugin patches
# that version's model runner.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/align-then-unlearn
COPY pyproject.toml README.md LICENSE ./
COPY atu ./atu
COPY serve ./serve
# The base image already holds vLLM and a CUDA torch that satisfy the extra; pip keeps them and adds the rest.
RUN python3 -m pip install --no-cache-dir ".[gpu]" \
    && python3 -c "import atu, serve.capture, vllm; print('atu', atu.__version__, 'vllm', vllm.__version__)"

# The base image's entrypoint is `vllm serve`; each compose service says what it runs.
ENTRYPOINT []
CMD ["atu", "--help"]
