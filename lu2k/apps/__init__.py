"""Applications over lu2k's messages: file transfer (``lu2k send``/``lu2k recv``) and TCP
port forwarding (``lu2k forward``).

Each application is a pure protocol core (messages in, messages and events out, no I/O,
no clock of its own) and a thin asyncio adapter over the shim's
:class:`~lu2k.kernel_shim.endpoint.AsyncEndpoint`:

* :mod:`.transfer_proto` / :mod:`.transfer` -- resumable, verified file and stream transfer;
* :mod:`.forward_proto` / :mod:`.forward` -- TCP connections as ordered, flow-controlled flows;
* :mod:`.pace` -- rate parsing and the per-transfer token bucket;
* :mod:`.portal` -- the shared adapter: attach on a free source portal, dispatch replies.
"""
