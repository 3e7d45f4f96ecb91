"""Read users and their certificates from Active Directory: settings and scope (settings), entries
as plain records (entries), paged full and delta reads (reader)."""

from certsync.directory.entries import ATTRIBUTES, DirectoryUser, smtp_addresses
from certsync.directory.reader import DirectoryError, DirectoryReader, ServerIdentity
from certsync.directory.settings import USER_FILTER, DirectorySettings

__all__ = [
    "ATTRIBUTES",
    "USER_FILTER",
    "DirectoryError",
    "DirectoryReader",
    "DirectorySettings",
    "DirectoryUser",
    "ServerIdentity",
    "smtp_addresses",
]
