"""Steps 7-10, from records to reports: the storage layout, record vocabulary and files, selection,
statistics, ranks, cost, leaderboards, reports and plots, bundles and their validation. Pure functions of what
storage holds: a leaderboard can be rebuilt from storage alone."""
