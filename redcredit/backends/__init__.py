"""The clients of the servers: Redis connections and error translation, PostgreSQL's SQL."""
