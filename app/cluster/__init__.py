"""`predict --cluster`: the same steps as `predict`, spread over a Ray cluster with Ray Data (an optional extra,
`pip install '.[cluster]'`); nothing in the service or the single-process path imports it."""
