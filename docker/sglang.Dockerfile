# syntax=docker/dockerfile:1
# The official SGLang image plus prefixgate's eviction hook. Build from the repository root:
#   docker build -f docker/sglang.Dockerfile -t prefixgate/sglang:v0.5.23 .
# (CUDA-specific variants of the base, e.g. lmsysorg/sglang:v0.5.23-cu130: --build-arg SGLANG_IMAGE=...)
#
# The hook is a small stdlib-only package (engines/hooks/, tested against SGLang 0.5.23): `python3 <folder> --install`
# copies it into the engine interpreter's site-packages as the package prefixgate_hook, with vLLM's plugin entry
# point and prefixgate_hook.pth (the fallback SGLang relies on), so the
# engine image needs none of prefixgate's dependencies. The .pth line does nothing unless PREFIXGATE_INDEX_URL
# is set when the engine starts; then evicted request ids are POSTed to {PREFIXGATE_INDEX_URL}/evict from a
# background thread (bearer token from PREFIXGATE_ADMIN_TOKEN, if set). The scheduler processes SGLang spawns
# inherit the variable and activate the hook themselves.

ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
FROM ${SGLANG_IMAGE}

COPY engines/hooks/ /tmp/prefixgate_hook/
# Install for the interpreter that runs sglang.launch_server, then prove the .pth is read by that interpreter:
# with the variable set, starting Python must import (and activate) the hook; without it, nothing is imported.
RUN python3 /tmp/prefixgate_hook --install \
    && rm -rf /tmp/prefixgate_hook \
    && PREFIXGATE_INDEX_URL=http://127.0.0.1:9 python3 -c "import sys; sys.exit('prefixgate_hook' not in sys.modules)" \
    && python3 -c "import sys; sys.exit('prefixgate_hook' in sys.modules)"

# The SGLang image is a development image with no server entry point; compose `command:` gives the flags.
ENTRYPOINT ["python3", "-m", "sglang.launch_server"]
