package main

import (
	"context"
	"encoding/json"
	"net/url"
	"os"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

// call sends one API request with a generous deadline. A 403 comes back
// as *api.DeniedError, whose message names the missing privilege (and
// which exitFor turns into exitDenied).
func (g *globals) call(method, path string, req, resp any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return api.NewClient(g.socket).Do(ctx, method, path, req, resp)
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func queryEscape(s string) string { return url.QueryEscape(s) }
func pathEscape(s string) string  { return url.PathEscape(s) }
