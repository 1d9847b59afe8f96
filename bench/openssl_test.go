package bench

import "testing"

func TestParseOpenSSLSpeed(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    float64
		wantErr bool
	}{
		{"single", "+DT:AES-256-XTS:1:4096\n+R:661054:AES-256-XTS:0.990000\n+H:4096\n+F:25:AES-256-XTS:2735027458.59\n", 2735027458.59, false},
		{"multi takes the parent's sum", "Got: +H:512 from 0\nGot: +F:25:AES-256-XTS:2442349568.00 from 0\nGot: +F:25:AES-256-XTS:1882144256.00 from 1\n+F:25:AES-256-XTS:4324493824.00\n", 4324493824, false},
		{"no result", "+H:512\n", 0, true},
		{"garbage figure", "+F:25:AES-256-XTS:abc\n", 0, true},
		{"zero figure", "+F:25:AES-256-XTS:0\n", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseOpenSSLSpeed([]byte(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if !tt.wantErr && got != tt.want {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
		})
	}
}
