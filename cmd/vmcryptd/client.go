package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

// call sends one API request with a generous deadline and turns a 403
// into a message naming the missing privilege.
func (g *globals) call(method, path string, req, resp any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := api.NewClient(g.socket).Do(ctx, method, path, req, resp)
	var de *api.DeniedError
	if errors.As(err, &de) {
		return fmt.Errorf("%s", de.Msg)
	}
	return err
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func queryEscape(s string) string { return url.QueryEscape(s) }
