# syntax=docker/dockerfile:1
# The official vLLM OpenAI server image plus prefixgate's eviction hook. Build from the repository root:
#   docker build -f docker/vllm.Dockerfile -t prefixgate/vllm-openai:v0.33.0 .
#
# The hook is a small stdlib-only package (engines/hooks/, tested against vLLM 0.33): `python3 <folder> --install`
# copies it into the engine interpreter's site-packages as the package prefixgate_hook, with vLLM's plugin entry
# point and prefixgate_hook.pth (the fallback SGLang relies on), so the
# engine image needs none of prefixgate's dependencies. The .pth line does nothing unless PREFIXGATE_INDEX_URL
# is set when the engine starts; then evicted request ids are POSTed to {PREFIXGATE_INDEX_URL}/evict from a
# background thread (bearer token from PREFIXGATE_ADMIN_TOKEN, if set).

ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

COPY engines/hooks/ /tmp/prefixgate_hook/
# Install for the interpreter that runs `vllm serve`, then prove the .pth is read by that interpreter: with
# the variable set, starting Python must import (and activate) the hook; without it, nothing is imported.
RUN python3 /tmp/prefixgate_hook --install \
    && rm -rf /tmp/prefixgate_hook \
    && PREFIXGATE_INDEX_URL=http://127.0.0.1:9 python3 -c "import sys; sys.exit('prefixgate_hook' not in sys.modules)" \
    && python3 -c "import sys; sys.exit('prefixgate_hook' in sys.modules)"

# The image's own entry point, restated so that compose `command:` is always just the model and flags.
ENTRYPOINT ["vllm", "serve"]
