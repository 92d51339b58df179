"""A container's bundle directory: the files the shim keeps there, the socket address derived from it.

`start` and `delete` import it: standard library only, nothing imported here."""
