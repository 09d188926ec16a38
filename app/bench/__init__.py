"""`bench`: the network and the service measured on this machine (`cli`, the command), by job: `network` (the
network alone beside the matmul ceiling), `instance_step`, `service` (end to end through a real uvicorn), `soak`,
`report` (the ratios and the table); `loadgen` (the load it offers) and `localserver` (the service it starts,
which the tests start too). Nothing is imported here: a load client process imports only `loadgen`."""
