"""Stand-ins for the hospital's systems during the demo.

- :class:`PacsStandIn`: a pynetdicom storage SCP (every storage class, every transfer syntax) that
  writes each object it receives to a folder and answers success.
- :class:`MllpStandIn`: an interface engine built on python-hl7's asyncio MLLP server, which stores
  each message and answers with python-hl7's own ``create_ack`` (MSA-1 ``AA``).
Both are third-party implementations, not msgate code, so the demo exercises real protocol peers.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


class PacsStandIn:
    """A storage SCP on 127.0.0.1 that keeps what it receives."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS") -> None:
        self.folder = folder
        self.ae_title = ae_title
        folder.mkdir(parents=True, exist_ok=True)
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        self._server: Any = None
        self.port = 0

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            path = self.folder / f"{len(self.received) + 1:04d}_{ds.Modality}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.received.append(ds)
        return 0x0000

    def start(self) -> int:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, context.transfer_syntax)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", 0), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self._server.server_address[1])
        return self.port

    def objects(self, modality: str | None = None) -> list[Dataset]:
        with self._lock:
            return [ds for ds in self.received if modality is None or ds.Modality == modality]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


class MllpStandIn:
    """python-hl7's asyncio MLLP server in a thread; ACKs every message with AA after saving it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.messages: list[str] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mllp-standin", daemon=True)

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                text = str(message)
                self.messages.append(text)
                (self.folder / f"{len(self.messages):04d}.hl7").write_text(text.replace("\r", "\n"))
                writer.writemessage(message.create_ack())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        import hl7.mllp

        self._loop = asyncio.new_event_loop()
        server = self._loop.run_until_complete(hl7.mllp.start_hl7_server(self._client, host="127.0.0.1", port=0))
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def start(self) -> int:
        self._thread.start()
        self._ready.wait(10)
        return self.port

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
