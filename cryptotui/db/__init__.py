"""Database access: connection, schema migrations, table names."""
