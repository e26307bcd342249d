"""Report rendering (HTML reports, leaderboards): pure functions of the results database."""
