"""What containerd runs: the shim's command line and its short-lived actions (`start`, `delete`, `-info`).

`start` and `delete` sit on containerd's hot path: standard library only, nothing imported here."""
