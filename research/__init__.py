"""Research studies behind the recipes: scripts, raw results and findings logs (never imported by the
package or the recipes)."""
