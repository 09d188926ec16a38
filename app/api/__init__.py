"""HTTP only: routes, schemas, dependencies, error mapping. The work itself happens in app.ml."""
