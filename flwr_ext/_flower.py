"""The one Flower constructor flwr-ext uses beyond Flower's typed API.

Flower 1.42's ``Message`` accepts ``metadata=`` (its own deserialisation and
``Message.create_reply`` use it), but its typed overloads do not declare it. A
strategy wrapper needs it to hand the inner strategy a *synthetic reply* that
carries a real reply's metadata; :class:`flwr_ext.inprocess.InProcessGrid` needs
it to copy a message as the receiver would see it. Keeping the call here keeps
the type checker's exception in one reviewed place.
"""

from __future__ import annotations

from flwr.app import Error, Message, Metadata, RecordDict

__all__ = ["message_with_metadata"]


def message_with_metadata(content: RecordDict | Error, metadata: Metadata) -> Message:
    """Return a ``Message`` with ``content`` (or an error) and ``metadata`` as given.

    Parameters
    ----------
    content : RecordDict or Error
        The message's content, or the error of an error reply.
    metadata : Metadata
        Used as is (pass a copy if the original must not be shared).
    """
    return Message(content, metadata=metadata)  # type: ignore[call-overload]
