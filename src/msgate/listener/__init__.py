"""msgate.listener: DICOM in (C-ECHO, C-STORE SCP), study tracking, series roles, routing, readiness.

Modules: ``server`` (AE, contexts, TLS, access control; the ``dicom`` role's ``run``), ``handlers``
(event handlers, status codes), ``dataset`` (pre-store checks), ``committer`` (group commit),
``tracking`` (readiness, scheduler hooks), ``rules`` (series roles and routing), ``fastpath``
(event-driven wake-ups for pynetdicom's acceptor threads).

Default configuration (``[dicom]`` in the TOML file, or ``MSGATE_DICOM__*``)::

    [dicom]
    ae_title = "MSGATE"          # called AE title
    host = "127.0.0.1"           # bind address; 0.0.0.0 to accept from the network
    port = 11112
    max_pdu = 262144             # maximum PDU we announce and receive (0: 64 MiB, the data phase's bound)
    acse_timeout = 30.0          # seconds
    dimse_timeout = 60.0
    network_timeout = 60.0
    max_associations = 32
    allowed_aets = []            # empty: any calling AE (a warning is logged at start)
    allowed_networks = []        # empty: any source address, e.g. ["10.20.0.0/16"]
    quiet_seconds = 10.0         # a study with no new instance for this long is stable
    [dicom.tls]
    enabled = false              # cert_file, key_file; with ca_file, client certificates are required

    [[rules.routing]]            # first match wins; default: MR brain -> pipeline (FLAIR required),
    action = "pipeline"          # everything else -> store_only
    modality = ["MR"]
    body_part = "^$|head|brain"
    required_roles = ["FLAIR"]

    [[rules.roles]]              # replaces the default role rules (see rules.DEFAULT_ROLE_RULES)
    role = "FLAIR"
    text = "dark[-_ ]?fluid|flair"

Answers to C-STORE: ``0x0000`` after the encrypted body is fsynced and the index row committed;
``0xA700`` out of resources (disk floor, database down); ``0xA900`` a required UID missing;
``0xC210`` undecodable or truncated; ``0xC000`` anything else. A duplicate (same SOP Instance UID,
same bytes) is a success and is not stored again; changed bytes are kept as a new version.

Study states: ``receiving`` -> ``ready`` | ``stable`` | ``stored`` | ``ignored`` (see
``storage.repo_studies``); a later instance reopens a finished study.
"""
