"""What an application imports: the async client, its generated sync twin, reservation blocks."""
