# msgate, CPU image: the light roles (dicom, hl7, scheduler, publish, keys) and CPU workers.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 10001 msgate && mkdir -p /var/lib/msgate/keys/he/public \
    && chown -R msgate /var/lib/msgate && chmod 700 /var/lib/msgate/keys /var/lib/msgate/keys/he
WORKDIR /opt/msgate
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
# torch's CPU build: the constraints pin torch==2.13.0, resolved here from PyTorch's CPU index.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt .
USER msgate
VOLUME ["/var/lib/msgate", "/var/lib/msgate/keys"]
EXPOSE 11112 2575 9464
ENTRYPOINT []
CMD ["msgate", "serve"]
