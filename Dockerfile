# rinha.py in a small image: official Python base, pinned runtime deps,
# non-root user. uvloop and orjson come as manylinux wheels, so no compiler
# is needed; the build stage only keeps pip's leftovers out of the final image.

FROM python:3.11-slim AS build
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --only-binary=:all: --prefix=/install -r /tmp/requirements.txt

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /install /usr/local
# /sockets and /data are volume mount points: a fresh named volume takes this
# ownership, so the instance can create its unix socket and journal there.
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin rinha \
    && mkdir -p /app /sockets /data \
    && chown rinha:rinha /app /sockets /data
WORKDIR /app
COPY rinha.py /app/rinha.py
USER rinha
CMD ["python", "rinha.py"]
