"""The pipeline stages; a stage imports only `stages.common` and `cache_schema`, never another stage."""
